"""Pure scorers: strings and numbers in, metrics out. No model, no I/O.

Each scorer follows its benchmark's official evaluation semantics; the source of every rule is
given in docs/eval_tasks.md and the edge cases are pinned by hand-worked tests.
"""
from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

# --- VQA accuracy (official VQA evaluation script, GT-Vision-Lab/VQA vqaEval.py) -------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a (mistyped) look-ahead that never
# fires before a '.', so the rule is "drop a period not followed by a digit". The official call passes
# re.UNICODE as `count`, so at most 32 such periods are removed; we keep both behaviours.
_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_MAX_PERIODS = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
    """The official `processPunctuation`: a punctuation mark is deleted when it touches a space
    (or when the text holds a digit,digit comma), otherwise replaced by a space; then periods not
    followed by a digit are deleted."""
    out = text
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_MAX_PERIODS)


def vqa_process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words → digits, drop articles,
    restore missing apostrophes of contractions, re-join on single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _clean_ws(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor (TextVQA's evaluator, `m4c_evaluator.EvalAIAnswerProcessor`, as
    LLaVA and lmms-eval use it): lower-case, drop ',' and '?', split "'s", clean whitespace, then the
    official punctuation and digit/article rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(_clean_ws(text))


VQA_NORMALIZE_MODES = ("official", "always", "textvqa")


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: str = "official") -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2/TextVQA).

    `normalize="official"` (VQAv2's vqaEval.py): whitespace cleaned; answers AND prediction are
    normalised only when the human answers are not all identical. `normalize="always"` (lmms-eval's
    VQAv2): the prediction always goes through the EvalAI processor, the answers as in "official".
    `normalize="textvqa"` (TextVQA's evaluator as LLaVA and lmms-eval run it): prediction and every
    answer always go through the EvalAI processor.
    Accuracy = mean over the leave-one-out subsets (leaving out by index) of min(#matches / 3, 1).
    """
    if normalize not in VQA_NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {VQA_NORMALIZE_MODES}, got {normalize!r}")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    if normalize == "textvqa":
        gts = [evalai_normalize(a) for a in answers]
        pred = evalai_normalize(prediction)
    else:
        gts = [_clean_ws(a) for a in answers]
        pred = _clean_ws(prediction)
        if normalize == "always":
            pred = evalai_normalize(pred)
        if len(set(gts)) > 1:
            gts = [vqa_normalize(a) for a in gts]
            pred = vqa_normalize(pred)
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# --- GQA -----------------------------------------------------------------------------------------------

def gqa_normalize(text: str) -> str:
    """Stated normalisation: whitespace collapsed, lower-case, trailing '.' removed (as LLaVA's GQA eval)."""
    return " ".join(text.split()).lower().rstrip(".").strip()


def gqa_exact_match(prediction: str, answer: str) -> float:
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


# --- yes/no parsing, POPE, MME ----------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """POPE's rule: keep the first sentence, drop commas; 'no' if it holds the word No/no/not, else 'yes'."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Binary metrics with 'yes' as the positive class; predictions are already 'yes'/'no'.

    precision is 0 when nothing is predicted 'yes'; recall 0 when no label is 'yes'; F1 0 when both are 0.
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError("pope_metrics needs equally many, non-zero predictions and labels")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in predictions) / len(predictions)}


def mme_parse(text: str) -> str:
    """MME's rule: 'yes'/'no' if the answer is exactly that (lower-cased); else look in its first
    4 characters for 'yes' then 'no'; else 'other' (always wrong)."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_metrics(records: Iterable[Mapping]) -> dict[str, float]:
    """records: {category, image, pred ('yes'|'no'|'other'), answer}. Per category acc (per question)
    and acc+ (images whose every question is right); score = 100·(acc + acc+); perception/cognition
    totals sum the category scores present."""
    by_cat: dict[str, list] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    out: dict[str, float] = {}
    all_correct, all_plus = [], []
    for cat, rs in sorted(by_cat.items()):
        correct = [r["pred"] == r["answer"].strip().lower() for r in rs]
        per_image: dict[str, list[bool]] = defaultdict(list)
        for r, c in zip(rs, correct):
            per_image[str(r["image"])].append(c)
        plus = [all(v) for v in per_image.values()]
        acc, acc_plus = sum(correct) / len(correct), sum(plus) / len(plus)
        out[f"{cat}/acc"], out[f"{cat}/acc_plus"], out[f"{cat}/score"] = acc, acc_plus, 100 * (acc + acc_plus)
        all_correct += correct
        all_plus += plus
    out["acc"] = sum(all_correct) / len(all_correct)
    out["acc_plus"] = sum(all_plus) / len(all_plus)
    out["perception_score"] = sum(out.get(f"{c}/score", 0.0) for c in MME_PERCEPTION)
    out["cognition_score"] = sum(out.get(f"{c}/score", 0.0) for c in MME_COGNITION)
    return out


# --- multiple choice: letters, extraction, circular evaluation -------------------------------------

LETTERS = string.ascii_uppercase


# VLMEvalKit (open-compass/VLMEvalKit, vlmeval/utils/matching_util.py at e8e78f05): answers it
# maps to the invalid option 'Z' (always wrong) before looking at letters.
_VLMEVALKIT_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                        "I'm sorry, but without the image provided", "Cannot determine the answer")
_VLMEVALKIT_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_LLAVA_SQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")
_LLAVA_SQA_LETTERS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default
ANSWER_PARSERS = ("vlmevalkit", "llava_scienceqa", "lenient")


def choice_vlmevalkit(text: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's `can_infer` (exact-matching policy, no judge; VERBOSE unset), as MMBench is scored.

    1. Letters: `.()[],:;!*#{}` become spaces and the answer is split into words. If exactly one
       option letter is a word and its first occurrence is among the last 4 words, that letter.
       With no letter but the word 'Z' (or a refusal phrase), 'Z': a wrong answer (returned as None).
    2. "answer is X" / "correct answer is **X**" (case-insensitive, X in A-D and an option letter).
    3. Option texts: unless the answer is longer than twice the options' total length, the one
       option whose text occurs in the lower-cased answer.
    Otherwise None (VLMEvalKit: 'Z', a failure that counts as wrong).
    """
    letters = list(LETTERS[: len(options)])
    if any(r in text for r in _VLMEVALKIT_REFUSALS):
        return None
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [ch for ch in letters if ch in words]
    if len(found) == 1:
        if words.index(found[0]) > len(words) - 5:
            return found[0]
    elif not found and "Z" in words:
        return None
    m = _VLMEVALKIT_VERBOSE.search(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    low = text.lower()
    if len(low) > 2 * sum(len(str(o)) for o in options):
        return None
    hits = [letters[i] for i, o in enumerate(options) if str(o).lower() in low]
    return hits[0] if len(hits) == 1 else None


def choice_llava_scienceqa(text: str, options: Sequence[str]) -> str | None:
    """LLaVA's `llava/eval/eval_science_qa.py` rule (the answer stripped, as `model_vqa_science`
    stores it): the answer is a bare letter A-E; or starts with "X. "; or holds exactly one
    "The answer is X." Otherwise, or when X is not one of the options, None (wrong)."""
    text = text.strip()
    if text in _LLAVA_SQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in _LLAVA_SQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _LLAVA_SQA_SENTENCE.findall(text)
        letter = found[0] if len(found) == 1 else ""
    return letter if letter in _LLAVA_SQA_LETTERS[: len(options)] else None


def choice_lenient(text: str, options: Sequence[str]) -> str | None:
    """This project's earlier rule, kept as a named option: words as in VLMEvalKit; exactly one option
    letter anywhere in the answer ("A" ignored in answers of more than 3 words, as an article); with
    no letter, the one option whose text occurs in the answer; several letters: None."""
    letters = LETTERS[: len(options)]
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    found = [ch for ch in letters if ch in words]
    if "A" in found and len(words) > 3:
        found.remove("A")
    if len(found) == 1:
        return found[0]
    if found:
        return None
    low = text.lower()
    hits = [letters[i] for i, o in enumerate(options) if str(o).strip() and str(o).strip().lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, options: Sequence[str], parser: str = "vlmevalkit") -> str | None:
    """The option letter a generated answer names under `parser` (see ANSWER_PARSERS), or None."""
    rule = {"vlmevalkit": choice_vlmevalkit, "llava_scienceqa": choice_llava_scienceqa,
            "lenient": choice_lenient}.get(parser)
    if rule is None:
        raise ValueError(f"answer parser must be one of {ANSWER_PARSERS}, got {parser!r}")
    return rule(text, options)


def letter_probabilities(logprobs: Sequence[float]) -> list[float]:
    """Softmax of per-letter log-probs: the letter distribution renormalised over the options."""
    m = max(logprobs)
    exps = [math.exp(x - m) for x in logprobs]
    z = sum(exps)
    return [e / z for e in exps]


def circular_accuracy(records: Iterable[Mapping]) -> dict[str, float]:
    """MMBench CircularEval: records {group, correct}; a question counts only when every rotation of
    its options is answered correctly. Also reports the plain per-rotation accuracy."""
    groups: dict[str, list[bool]] = defaultdict(list)
    n = c = 0
    for r in records:
        groups[str(r["group"])].append(bool(r["correct"]))
        n += 1
        c += bool(r["correct"])
    return {"circular_acc": sum(all(v) for v in groups.values()) / len(groups), "vanilla_acc": c / n}


# --- image-text matching ----------------------------------------------------------------------------

def winoground_scores(s: Sequence[Sequence[float]]) -> dict[str, bool]:
    """s[c][i] = score of caption c with image i (2×2). Text score: each image prefers its caption;
    image score: each caption prefers its image; group: both (Thrush et al. 2022). Ties fail."""
    text = s[0][0] > s[1][0] and s[1][1] > s[0][1]
    image = s[0][0] > s[0][1] and s[1][1] > s[1][0]
    return {"text": text, "image": image, "group": text and image}


def argmax_correct(scores: Sequence[float], label: int) -> bool:
    """True when the label's score is strictly the highest (a tie with another candidate fails)."""
    best = max(scores)
    return scores[label] == best and sum(1 for x in scores if x == best) == 1


def spec_metrics(records: Iterable[Mapping]) -> dict[str, float]:
    """records {subset, direction ('i2t'|'t2i'), correct}: accuracy per subset and direction, and the
    unweighted mean over subsets per direction (SPEC's reporting)."""
    acc: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for r in records:
        acc[(r["subset"], r["direction"])].append(bool(r["correct"]))
    out = {f"{sub}/{d}": sum(v) / len(v) for (sub, d), v in sorted(acc.items())}
    for d in ("i2t", "t2i"):
        subs = [v for (sub, dd), v in acc.items() if dd == d]
        if subs:
            out[d] = sum(sum(v) / len(v) for v in subs) / len(subs)
    present = [out[d] for d in ("i2t", "t2i") if d in out]
    if present:  # the mean of both directions; of the one scored when an item limit left the other out
        out["mean"] = sum(present) / len(present)
    return out


def grouped_accuracy(records: Iterable[Mapping], key: str) -> dict[str, float]:
    """Accuracy overall and per value of `key` (records hold `correct` and `key`)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    allc = []
    for r in records:
        groups[str(r[key])].append(bool(r["correct"]))
        allc.append(bool(r["correct"]))
    out = {f"{key}={g}": sum(v) / len(v) for g, v in sorted(groups.items())}
    out["acc"] = sum(allc) / len(allc)
    return out


def name_in_answer(answer: str, names: Sequence[str]) -> bool:
    """Zhang et al.'s open-world rule: correct when a gold name (or synonym) occurs, case-insensitively."""
    low = answer.lower()
    return any(n.strip() and n.strip().lower() in low for n in names)


def topk_correct(scores: Sequence[float], label: int, k: int) -> bool:
    """The label is among the k highest scores (ties broken by index, lower first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return label in order[:k]


# --- per-item contributions (what `Task.item_scores` returns; the report's statistics use the same) -------

ItemScore = float | Sequence[float]


def as_num_den(score: ItemScore) -> tuple[float, float]:
    """An item's contribution to a metric `Σ num / Σ den`: a number is `(score, 1)` (a plain mean); a pair is
    `(numerator, denominator)` (a weighted mean such as a mean over subsets, or a ratio such as F1)."""
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return float(score), 1.0
    if isinstance(score, Sequence) and not isinstance(score, str) and len(score) == 2:
        return float(score[0]), float(score[1])
    raise ValueError(f"an item score must be a number or [numerator, denominator], got {score!r}")


def ratio_of_sums(scores: Mapping[str, ItemScore]) -> float:
    """The metric the item contributions add up to; 0 when every denominator is 0 (as the scorers define
    precision, recall and F1 with nothing to count)."""
    pairs = [as_num_den(s) for s in scores.values()]
    den = sum(d for _, d in pairs)
    return sum(n for n, _ in pairs) / den if den else 0.0


def pope_item_scores(record: Mapping) -> dict[str, ItemScore]:
    """One POPE answer's share of acc, precision, recall and F1 (`2tp / (2tp + fp + fn)` = pope_metrics' F1)."""
    yes_pred, yes_gold = record["pred"] == "yes", record["label"] == "yes"
    tp, fp, fn = yes_pred and yes_gold, yes_pred and not yes_gold, yes_gold and not yes_pred
    return {"acc": float(record["pred"] == record["label"]), "precision": [float(tp), float(tp or fp)],
            "recall": [float(tp), float(tp or fn)], "f1": [2.0 * tp, 2.0 * tp + fp + fn]}


def by_metric(per_item: Mapping[str, Mapping[str, ItemScore]]) -> dict[str, dict[str, ItemScore]]:
    """{item id: {metric: score}} -> {metric: {item id: score}}."""
    out: dict[str, dict[str, ItemScore]] = defaultdict(dict)
    for item, scores in per_item.items():
        for metric, s in scores.items():
            out[metric][item] = s
    return dict(out)
