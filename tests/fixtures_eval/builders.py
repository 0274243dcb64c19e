"""Tiny benchmark fixtures in each benchmark's real on-disk format, written into a temp folder.

Images are solid 8×8 PNG/JPEG squares; their colour is what `FakeVLM` "sees" (see `VISION`)."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

C = {"red": (200, 0, 0), "blue": (0, 0, 200), "green": (0, 200, 0), "yellow": (200, 200, 0),
     "white": (250, 250, 250), "black": (5, 5, 5), "gray": (100, 100, 100), "cyan": (0, 200, 200),
     "purple": (120, 0, 120), "orange": (230, 120, 0)}

VISION = {
    C["red"]: "red cardinal",
    C["blue"]: "blue jay",
    C["green"]: "green parakeet",
    C["yellow"]: "yellow warbler",
    C["white"]: "two dogs on the left of a big tree",
    C["black"]: "three cats",
    C["gray"]: "a red ball",
    C["cyan"]: "a blue ball",
    C["purple"]: "a dog chasing a cat",
    C["orange"]: "a cat chasing a dog",
}


def solid(color: str) -> Image.Image:
    return Image.new("RGB", (8, 8), C[color])


def save(path: Path, color: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    solid(color).save(path)
    return path.name


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BIRDS = ["red cardinal", "blue jay", "green parakeet", "yellow warbler"]
BIRD_COLORS = ["red", "blue", "green", "yellow"]


def classification_folder(root: Path) -> Path:
    """Local folder: classes.json (names + synonyms), train.jsonl, test.jsonl, images/."""
    classes = [{"name": "red cardinal", "synonyms": ["cardinal"]}, "blue jay", "green parakeet", "yellow warbler"]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(classes))
    for split, reps in (("train", 3), ("test", 2)):
        rows = []
        for r in range(reps):
            for name, color in zip(BIRDS, BIRD_COLORS):
                rel = f"images/{split}_{color}_{r}.png"
                save(root / rel, color)
                rows.append({"image": rel, "label": name})
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def classification_hf(root: Path) -> Path:
    """An HF dataset (Image + ClassLabel with underscore names) saved with save_to_disk."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "label": ClassLabel(names=["001.red_cardinal", "002.blue_jay",
                                                                      "003.green_parakeet", "004.yellow_warbler"])})
    splits = {}
    for split, reps in (("train", 2), ("test", 1)):
        ims, labels = [], []
        for _ in range(reps):
            for i, color in enumerate(BIRD_COLORS):
                ims.append(solid(color))
                labels.append(i)
        splits[split] = Dataset.from_dict({"image": ims, "label": labels}, features=feats)
    DatasetDict(splits).save_to_disk(str(root))
    return root


def vqav2(root: Path) -> dict:
    """Official VQAv2 question + annotation files with COCO-named images."""
    qs = [{"image_id": 1, "question": "What animal is this?", "question_id": 10},
          {"image_id": 2, "question": "How many cats?", "question_id": 20},
          {"image_id": 1, "question": "What color is the bird?", "question_id": 30}]
    def answers(xs):
        return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(xs)]
    anns = [{"question_id": 10, "image_id": 1, "answer_type": "other", "question_type": "what",
             "answers": answers(["bird"] * 2 + ["cardinal"] * 8)},
            {"question_id": 20, "image_id": 2, "answer_type": "number", "question_type": "how many",
             "answers": answers(["3"] * 9 + ["three"])},
            {"question_id": 30, "image_id": 1, "answer_type": "other", "question_type": "what color",
             "answers": answers(["red"] * 10)}]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "questions.json").write_text(json.dumps({"questions": qs}))
    (root / "annotations.json").write_text(json.dumps({"annotations": anns}))
    save(root / "COCO_val2014_000000000001.jpg", "red")
    save(root / "COCO_val2014_000000000002.jpg", "black")
    return {"questions_file": str(root / "questions.json"), "annotations_file": str(root / "annotations.json")}


def textvqa(root: Path) -> str:
    data = {"data": [{"question_id": 1, "question": "what brand?", "image_id": "abc",
                      "answers": ["nokia"] * 4 + ["Nokia."] * 6}]}
    save(root / "abc.jpg", "red")
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    return str(root / "TextVQA_0.5.1_val.json")


def gqa(root: Path) -> str:
    data = {"q1": {"imageId": "n1", "question": "What color is the bird?", "answer": "red"},
            "q2": {"imageId": "n2", "question": "What animal is it?", "answer": "dogs"}}
    save(root / "n1.jpg", "red")
    save(root / "n2.jpg", "black")
    (root / "testdev_balanced_questions.json").write_text(json.dumps(data))
    return str(root / "testdev_balanced_questions.json")


def pope(root: Path) -> dict:
    save(root / "img_cats.jpg", "black")
    save(root / "img_dogs.jpg", "white")
    files = {}
    for cat in ("random", "adversarial"):
        rows = [{"question_id": 1, "image": "img_cats.jpg", "text": "Is there a cat in the image?", "label": "yes"},
                {"question_id": 2, "image": "img_cats.jpg", "text": "Is there a dog in the image?", "label": "no"},
                {"question_id": 3, "image": "img_dogs.jpg", "text": "Is there a dog in the image?", "label": "yes"},
                {"question_id": 4, "image": "img_dogs.jpg", "text": "Is there a tree in the image?",
                 "label": "no" if cat == "random" else "yes"}]
        files[cat] = str(write_jsonl(root / f"coco_pope_{cat}.json".replace(".json", ".jsonl"), rows))
    return files


def mme(root: Path) -> Path:
    """MME release layout: flat category folder (img + txt) and one with images/ + questions_answers_YN/."""
    d = root / "existence"
    save(d / "000.png", "black")
    (d / "000.txt").write_text("Is there a cat in this image? Please answer yes or no.\tYes\n"
                               "Is there a dog in this image? Please answer yes or no.\tNo\n")
    save(d / "001.png", "white")
    (d / "001.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                               "Is there a cat in this image? Please answer yes or no.\tYes\n")
    s = root / "scene"
    save(s / "images" / "a.jpg", "white")
    (s / "questions_answers_YN").mkdir(parents=True)
    (s / "questions_answers_YN" / "a.txt").write_text("Is there a tree in this image? Please answer yes or no.\tYes\n"
                                                       "Is there a sea in this image? Please answer yes or no.\tNo\n")
    return root


def _b64(color: str) -> str:
    buf = io.BytesIO()
    solid(color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mmbench(root: Path) -> str:
    """Official MMBench TSV with base64 images, including a circular copy (index + 1e6) to skip."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {"index": 0, "question": "Which bird is shown?", "hint": "nan", "A": "blue jay", "B": "red cardinal",
         "C": "green parakeet", "D": "yellow warbler", "answer": "B", "category": "fine", "image": _b64("red")},
        {"index": 1000000, "question": "Which bird is shown?", "hint": "nan", "A": "red cardinal", "B": "green parakeet",
         "C": "yellow warbler", "D": "blue jay", "answer": "A", "category": "fine", "image": _b64("red")},
        # 3 options; the fake picks "three cats" wrongly for rotation where ... (always right here)
        {"index": 1, "question": "How many cats?", "hint": "Count them.", "A": "two cats", "B": "three cats",
         "C": "four dogs", "D": "", "answer": "B", "category": "count", "image": _b64("black")},
        # ambiguous for the fake: both options tie -> picks the first listed -> wrong in some rotation
        {"index": 2, "question": "What is this?", "hint": "nan", "A": "jay blue", "B": "blue jay", "C": "", "D": "",
         "answer": "B", "category": "fine", "image": _b64("blue")},
    ]
    path = root / "mmbench_dev_en.tsv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def scienceqa(root: Path) -> str:
    problems = {
        "5": {"question": "Which bird is this?", "choices": ["blue jay", "red cardinal"], "answer": 1,
              "hint": "A bird.", "image": "image.png", "split": "test"},
        "6": {"question": "Which is a number?", "choices": ["cat", "7"], "answer": 1, "hint": "",
              "image": None, "split": "test"},
        "7": {"question": "Which animal?", "choices": ["three cats", "one fish"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test"},
        "8": {"question": "Which animal?", "choices": ["three cats", "one fish"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"},
    }
    save(root / "images" / "test" / "5" / "image.png", "red")
    save(root / "images" / "test" / "7" / "image.png", "blue")  # the fake cannot answer: parse -> no overlap
    (root / "problems.json").write_text(json.dumps(problems))
    return str(root / "problems.json")


def spec(root: Path) -> Path:
    """The six SPEC subsets (release folder names) with image2text.json / text2image.json ({query, keys, label})."""
    c = root / "count"
    save(c / "images" / "two.jpg", "white")
    save(c / "images" / "three.jpg", "black")
    (c / "image2text.json").write_text(json.dumps([
        {"query": "images/two.jpg", "keys": ["three dogs", "two dogs", "four dogs"], "label": 1},
        {"query": "images/three.jpg", "keys": ["three cats", "two cats"], "label": 0}]))
    (c / "text2image.json").write_text(json.dumps([
        {"query": "three cats", "keys": ["images/two.jpg", "images/three.jpg"], "label": 1}]))
    p = root / "absolute_spatial"
    save(p / "left.jpg", "white")
    save(p / "cat.jpg", "black")
    (p / "image2text.json").write_text(json.dumps([
        {"query": "left.jpg", "keys": ["dogs on the right", "dogs on the left"], "label": 1}]))
    (p / "text2image.json").write_text(json.dumps([
        {"query": "two dogs on the right", "keys": ["left.jpg", "cat.jpg"], "label": 1}]))  # fake picks left.jpg: wrong
    for sub in ("absolute_size", "relative_size", "relative_spatial", "existence"):  # one easy item per direction
        d = root / sub
        save(d / "dogs.jpg", "white")
        save(d / "cats.jpg", "black")
        (d / "image2text.json").write_text(json.dumps([
            {"query": "dogs.jpg", "keys": ["two dogs on the left of a big tree", "a red ball"], "label": 0}]))
        (d / "text2image.json").write_text(json.dumps([{"query": "three cats", "keys": ["dogs.jpg", "cats.jpg"], "label": 1}]))
    return root


def winoground(root: Path) -> str:
    save(root / "ex0_img0.png", "purple")
    save(root / "ex0_img1.png", "orange")
    save(root / "ex1_img0.png", "gray")
    save(root / "ex1_img1.png", "cyan")
    rows = [{"id": 0, "caption_0": "a dog chasing a cat", "caption_1": "a cat chasing a dog",
             "image_0": "ex0_img0", "image_1": "ex0_img1"},
            {"id": 1, "caption_0": "a red ball", "caption_1": "a blue ball", "image_0": "ex1_img0", "image_1": "ex1_img1"}]
    return str(write_jsonl(root / "examples.jsonl", rows))


def valse(root: Path) -> dict:
    save(root / "images" / "cats.jpg", "black")
    ok = {"caption": 3, "foil": 0, "other": 0}
    counting = {"c1": {"image_file": "cats.jpg", "caption": "three cats", "foil": "two cats", "dataset": "x", "mturk": ok},
                "c2": {"image_file": "cats.jpg", "caption": "cats", "foil": "three cats", "dataset": "x", "mturk": ok}}
    existence = {"e1": {"image_file": "cats.jpg", "caption": "there are cats", "foil": "there are no cats", "mturk": ok}}
    (root / "counting.json").write_text(json.dumps(counting))
    (root / "existence.json").write_text(json.dumps(existence))
    return {"counting": str(root / "counting.json"), "existence": str(root / "existence.json")}


def svo_probes(root: Path) -> str:
    save(root / "img" / "100.jpg", "purple")
    save(root / "img" / "101.jpg", "black")
    save(root / "img" / "102.jpg", "gray")
    rows = [{"sentence": "a dog chasing a cat", "pos_image_id": "100", "neg_image_id": "101",
             "subj_neg": "False", "verb_neg": "False", "obj_neg": "True"},
            {"sentence": "cats", "pos_image_id": "101", "neg_image_id": "100",
             "subj_neg": "True", "verb_neg": "False", "obj_neg": "False"},
            {"sentence": "a red ball", "pos_image_id": "101", "neg_image_id": "102",
             "subj_neg": "False", "verb_neg": "True", "obj_neg": "False"}]
    path = root / "svo_probes.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def vsr(root: Path) -> str:
    save(root / "images" / "000000000001.jpg", "white")
    rows = [{"image": "000000000001.jpg", "caption": "two dogs on the left of a tree", "label": 1, "relation": "left of"},
            {"image": "000000000001.jpg", "caption": "two cats under a tree", "label": 0, "relation": "under"},
            {"image": "000000000001.jpg", "caption": "the tree is big", "label": 1, "relation": "has"}]
    return str(write_jsonl(root / "test.jsonl", rows))
