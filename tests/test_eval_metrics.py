"""Hand-worked cases for every scorer in eval.metrics, including the official scripts' edge cases."""
import math

import pytest

from eval.metrics import (circular_accuracy, extract_choice, gqa_exact_match, grouped_accuracy, letter_probabilities,
                          mme_metrics, mme_parse, name_in_answer, pope_metrics, pope_parse, spec_metrics, topk_correct,
                          vqa_accuracy, vqa_normalize, vqa_process_punctuation, winoground_scores)

# --- VQA accuracy ---------------------------------------------------------------------------------


def test_vqa_all_leave_one_out_subsets_match():
    assert vqa_accuracy("cardinal", ["bird"] * 2 + ["cardinal"] * 8) == 1.0


def test_vqa_minority_answer_averages_over_subsets_by_index():
    # leave out a "bird" (2x): 1 match -> 1/3; leave out a "cardinal" (8x): 2 matches -> 2/3
    assert vqa_accuracy("bird", ["bird"] * 2 + ["cardinal"] * 8) == pytest.approx((2 / 3 + 16 / 3) / 10)


def test_vqa_three_matches_is_point_nine_and_one_match_point_three():
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("green", ["red"] * 3 + ["blue"] * 7) == 0.0


def test_vqa_no_normalisation_when_all_answers_identical():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0            # official quirk: no lower-casing
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("t shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0  # answers differ -> '-' becomes ' '
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0         # whitespace is always cleaned


def test_vqa_always_variant_normalises_the_prediction():
    assert vqa_accuracy("Yes", ["yes"] * 10, normalize="always") == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, normalize="always") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, normalize="always") == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("a", ["a"], normalize="sometimes")
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


def test_vqa_number_words_articles_contractions_punctuation():
    assert vqa_accuracy("three", ["3"] * 9 + ["three"]) == 1.0
    assert vqa_accuracy("The dog.", ["a dog"] * 5 + ["dog"] * 5) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 5 + ["1,000"] * 5) == 1.0
    assert vqa_accuracy("None", ["0"] * 5 + ["zero"] * 5) == 1.0


def test_vqa_punctuation_rules():
    assert vqa_process_punctuation("black/white") == "black white"        # not touching a space -> space
    assert vqa_normalize("black / white") == "black white"                 # touching a space -> removed
    assert vqa_process_punctuation("yes!") == "yes "
    assert vqa_process_punctuation("3.5") == "3.5"                         # period before a digit is kept
    assert vqa_process_punctuation("end.") == "end"
    assert vqa_process_punctuation("e.g.") == "eg"
    assert vqa_process_punctuation("1,5 a/b") == "15 ab"                   # digit,digit: every mark deleted
    assert vqa_process_punctuation("." * 40) == "." * 8                    # re.UNICODE passed as count=32
    assert vqa_normalize("It's A Dog") == "it's dog"
    assert vqa_normalize("isnt") == "isn't"


# --- GQA, POPE, MME -------------------------------------------------------------------------------


def test_gqa_exact_match():
    assert gqa_exact_match("Red.", "red") == 1.0
    assert gqa_exact_match("  left  side ", "left side") == 1.0
    assert gqa_exact_match("the red", "red") == 0.0


def test_pope_parse():
    assert pope_parse("No, there is not.") == "no"
    assert pope_parse("Yes, there is a dog. No cat.") == "yes"   # only the first sentence counts
    assert pope_parse("There is no dog") == "no"
    assert pope_parse("not sure") == "no"
    assert pope_parse("Nope") == "yes"                            # the rule's known blind spot
    assert pope_parse("NO") == "yes"


def test_pope_metrics():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m == pytest.approx({"acc": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m == {"acc": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        pope_metrics([], [])


def test_mme_parse_and_metrics():
    assert [mme_parse(t) for t in ["Yes", "yes, it is", "No.", "Nothing", "I think yes", " NO "]] == \
        ["yes", "yes", "no", "no", "other", "no"]
    recs = [{"category": "existence", "image": "a", "pred": "yes", "answer": "Yes"},
            {"category": "existence", "image": "a", "pred": "no", "answer": "No"},
            {"category": "existence", "image": "b", "pred": "yes", "answer": "Yes"},
            {"category": "existence", "image": "b", "pred": "other", "answer": "No"},
            {"category": "code_reasoning", "image": "c", "pred": "no", "answer": "No"},
            {"category": "code_reasoning", "image": "c", "pred": "no", "answer": "No"}]
    m = mme_metrics(recs)
    assert m["existence/acc"] == 0.75 and m["existence/acc_plus"] == 0.5 and m["existence/score"] == 125
    assert m["perception_score"] == 125 and m["cognition_score"] == 200
    assert m["acc"] == pytest.approx(5 / 6) and m["acc_plus"] == pytest.approx(2 / 3)


# --- multiple choice ---------------------------------------------------------------------------------

OPTS = ["red cardinal", "blue jay", "green parakeet"]


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B.", "B"), ("(C) green parakeet", "C"), ("The answer is C.", "C"), ("A", "A"), ("A. red", "A"),
    ("A blue jay sits on a branch", "B"),      # 'A' in a long answer is the article -> option text decides
    ("It is a green parakeet", "C"), ("B or C", None), ("I don't know", None), ("D", None),
    ("red cardinal or blue jay", None), ("b", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTS) == expected


def test_letter_probabilities_and_circular():
    assert letter_probabilities([math.log(0.2), math.log(0.3)]) == pytest.approx([0.4, 0.6])
    assert letter_probabilities([-1000.0, -1000.0]) == pytest.approx([0.5, 0.5])
    recs = [{"group": 0, "correct": True}] * 4 + [{"group": 1, "correct": c} for c in (True, False, True)]
    assert circular_accuracy(recs) == pytest.approx({"circular_acc": 0.5, "vanilla_acc": 6 / 7})


# --- matching ------------------------------------------------------------------------------------------


def test_winoground_scores():
    assert winoground_scores([[-1, -3], [-2, -0.5]]) == {"text": True, "image": True, "group": True}
    assert winoground_scores([[-1, -0.5], [-2, -0.4]]) == {"text": True, "image": False, "group": False}
    assert winoground_scores([[-1, -1], [-1, -1]]) == {"text": False, "image": False, "group": False}
    assert winoground_scores([[-3, -1], [-2, -2]]) == {"text": False, "image": False, "group": False}


def test_spec_metrics_unweighted_over_subsets():
    recs = ([{"subset": "a", "direction": "i2t", "correct": c} for c in (True, False)]
            + [{"subset": "a", "direction": "t2i", "correct": True}]
            + [{"subset": "b", "direction": "i2t", "correct": True}]
            + [{"subset": "b", "direction": "t2i", "correct": False}] * 2)
    m = spec_metrics(recs)
    assert m["a/i2t"] == 0.5 and m["b/t2i"] == 0.0
    assert m["i2t"] == 0.75 and m["t2i"] == 0.5 and m["mean"] == 0.625


def test_grouped_topk_and_names():
    m = grouped_accuracy([{"k": "x", "correct": True}, {"k": "x", "correct": False}, {"k": "y", "correct": True}], "k")
    assert m == pytest.approx({"k=x": 0.5, "k=y": 1.0, "acc": 2 / 3})
    assert topk_correct([0.1, 0.5, 0.5], 2, 1) is False and topk_correct([0.1, 0.5, 0.5], 1, 1) is True
    assert topk_correct([0.1, 0.5, 0.3], 0, 2) is False and topk_correct([0.1, 0.5, 0.3], 0, 3) is True
    assert name_in_answer("It is a Northern CARDINAL.", ["red cardinal", "cardinal"])
    assert not name_in_answer("a bird", ["red cardinal", ""])
