"""Every task end-to-end on tiny fixtures in the benchmark's own format, with the rule-based FakeVLM,
so each expected metric is worked out by hand (see the comments and tests/fixtures_eval/builders.py)."""
import json

import pytest

from eval.classification import ClassificationData, class_similarity, mine_options
from eval.runner import build_task
from fixtures_eval import builders as B
from fixtures_eval.fake_model import FakeVLM
from vlm.errors import UserError
from vlm.io import read_json, read_jsonl


@pytest.fixture
def model():
    return FakeVLM(B.VISION)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_ABLATE_CACHE", str(tmp_path / "cache"))


def run(task_cfg, model, tmp_path, bs=3):
    task = build_task(task_cfg)
    res = task.run(model, tmp_path / "out" / task.name, batch_size=bs)
    return res, list(read_jsonl(tmp_path / "out" / task.name / "predictions.jsonl"))


# --- fine-grained classification ----------------------------------------------------------------------


def test_classification_all_protocols_local_folder(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    vision = {**B.VISION, B.C["yellow"]: "green parakeet"}  # the model mistakes the warbler
    cfg = {"type": "classification", "name": "birds", "path": str(root), "k": 4,
           "protocols": ["mc", "open", "likelihood"]}
    res, recs = run(cfg, FakeVLM(vision), tmp_path)
    m = res["metrics"]
    assert res["family"] == "fine_grained" and res["headline"] == "mc_acc" and res["num_items"] == 8
    assert m["mc_acc"] == 0.75 and m["mc_gen_acc"] == 0.75 and m["mc_gen_parse_failure"] == 0.0
    assert m["open_acc"] == 0.75
    assert m["likelihood_sum_top1"] == 0.75 and m["likelihood_mean_top1"] == 0.75
    assert m["likelihood_sum_top5"] == 1.0
    assert res["options"]["method"] == "tfidf" and res["options"]["k"] == 4
    r0 = recs[0]
    assert sorted(r0["mc_options"]) == [0, 1, 2, 3] and r0["mc_options"].index(r0["label"]) == "ABCD".index(r0["mc_answer"])
    assert sum(r0["mc_probs"]) == pytest.approx(1.0)


def test_open_protocol_accepts_synonyms(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    fake = FakeVLM(B.VISION, answers={"What type of object": "It is a Cardinal."})
    res, _ = run({"type": "classification", "name": "o", "path": str(root), "protocols": ["open"]}, fake, tmp_path)
    assert res["metrics"] == {"open_acc": 0.25} and res["headline"] == "open_acc"  # only the red cardinal items


def test_likelihood_shares_the_prefix(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    fake = FakeVLM(B.VISION)
    res, recs = run({"type": "classification", "name": "l", "path": str(root), "protocols": ["likelihood"]}, fake, tmp_path, bs=8)
    # one score call per batch (8 items), 4 class names + the bare answer prefix each
    assert fake.calls["score"] == 1 and fake.calls["continuations"] == 8 * 5
    assert res["metrics"]["likelihood_sum_top1"] == 1.0 and recs[0]["likelihood_mean_top5"][0] == recs[0]["label"]


def test_options_are_mined_once_and_reused(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    opt_file = tmp_path / "opts.json"
    cfg = {"type": "classification", "name": "b", "path": str(root), "k": 3, "seed": 7, "options_file": str(opt_file),
           "mc_generate": False}
    res, _ = run(cfg, FakeVLM(B.VISION, with_llm=True), tmp_path)
    mined = read_json(opt_file)
    assert mined["method"] == "llm" and mined["seed"] == 7 and all(len(v) == 3 for v in mined["items"].values())
    assert "mc_gen_acc" not in res["metrics"]
    res2, _ = run({**cfg, "name": "b2", "mining": "tfidf"}, FakeVLM(B.VISION), tmp_path)
    assert read_json(opt_file) == mined and res2["options"]["method"] == "llm"
    with pytest.raises(UserError, match="other classes or another k"):
        run({**cfg, "name": "b3", "k": 2}, FakeVLM(B.VISION), tmp_path)


def test_mining_picks_most_similar_names(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    data = ClassificationData({"path": str(root)}, "test")
    data.names = ["black-footed albatross", "laysan albatross", "red cardinal", "blue jay"]
    mined = mine_options(data, 2, 0, "tfidf")
    black = [r for r in data.rows if r["label"] == 0][0]["id"]
    assert sorted(mined["items"][black]) == [0, 1]
    sim = class_similarity(data.names, "llm", FakeVLM(B.VISION, with_llm=True))
    assert sim.shape == (4, 4) and sim[0, 1] == pytest.approx(sim[1, 0])
    with pytest.raises(UserError):
        mine_options(data, 9, 0, "tfidf")


def test_classification_hf_dataset_with_classlabel(tmp_path):
    path = B.classification_hf(tmp_path / "hfds")
    cfg = {"type": "classification", "name": "hf", "hf": str(path), "split": "test", "clean_names": True, "k": 2}
    res, recs = run(cfg, FakeVLM(B.VISION), tmp_path)
    assert res["num_items"] == 4 and res["metrics"]["mc_acc"] == 1.0
    assert {r["id"] for r in recs} == {f"test-{i}" for i in range(4)}


def test_linear_probe(tmp_path):
    root = B.classification_folder(tmp_path / "birds")
    res, recs = run({"type": "linear_probe", "name": "probe", "path": str(root)}, FakeVLM(B.VISION), tmp_path)
    assert res["family"] == "probe" and res["metrics"]["acc"] == 1.0 and res["metrics"]["num_train"] == 12
    assert len(recs) == 8


def test_classification_config_errors(tmp_path):
    with pytest.raises(UserError, match="protocols"):
        build_task({"type": "classification", "name": "x", "protocols": ["zero-shot"]})
    with pytest.raises(UserError, match="needs `hf"):
        build_task({"type": "classification", "name": "x"}).items()
    root = B.classification_folder(tmp_path / "birds")
    (root / "test.jsonl").write_text(json.dumps({"image": "images/test_red_0.png", "label": "owl"}) + "\n")
    with pytest.raises(UserError, match="not a known class"):
        build_task({"type": "classification", "name": "x", "path": str(root)}).items()


# --- general VQA ---------------------------------------------------------------------------------------

VQA_ANSWERS = {"What animal is this?": "cardinal", "How many cats?": "three", "What color is the bird?": "Red"}


def test_vqav2_official_and_always(tmp_path):
    files = B.vqav2(tmp_path / "vqa")
    res, recs = run({"type": "vqav2", "name": "vqav2", **files}, FakeVLM(B.VISION, VQA_ANSWERS), tmp_path)
    # q10: 1.0; q20 ("three" vs 9x"3"+"three"): 1.0; q30 ("Red" vs 10x"red", identical -> not normalised): 0
    assert res["metrics"] == pytest.approx({"acc": 2 / 3, "acc/number": 1.0, "acc/other": 0.5})
    assert {r["id"] for r in recs} == {"10", "20", "30"}
    res, _ = run({"type": "vqav2", "name": "vqav2_lmms", "normalize": "always", **files},
                 FakeVLM(B.VISION, VQA_ANSWERS), tmp_path)
    assert res["score"] == 1.0


def test_textvqa_and_gqa(tmp_path):
    path = B.textvqa(tmp_path / "tv")
    res, _ = run({"type": "textvqa", "name": "tv", "data_file": path}, FakeVLM(B.VISION, {"what brand": "NOKIA"}), tmp_path)
    assert res["score"] == 1.0
    path = B.gqa(tmp_path / "gqa")
    res, _ = run({"type": "gqa", "name": "gqa", "data_file": path},
                 FakeVLM(B.VISION, {"What color is the bird?": "Red.", "What animal is it?": "cats"}), tmp_path)
    assert res["score"] == 0.5


def test_pope(tmp_path, model):
    files = B.pope(tmp_path / "pope")
    res, recs = run({"type": "pope", "name": "pope", "data_files": files}, model, tmp_path)
    m = res["metrics"]
    # TP=5 TN=2 FP=1 FN=0 (the tree question is 'no' in random, 'yes' in adversarial)
    assert m["acc"] == 7 / 8 and m["precision"] == pytest.approx(5 / 6) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(10 / 11) and m["yes_ratio"] == 0.75 and res["score"] == m["f1"]
    assert m["random/f1"] == pytest.approx(0.8) and m["adversarial/acc"] == 1.0


def test_mme(tmp_path, model):
    root = B.mme(tmp_path / "MME")
    res, _ = run({"type": "mme", "name": "mme", "path": str(root)}, model, tmp_path)
    m = res["metrics"]
    assert m["existence/acc"] == 0.75 and m["existence/acc_plus"] == 0.5 and m["scene/score"] == 200
    assert m["perception_score"] == 325 and m["acc"] == pytest.approx(5 / 6) and m["acc_plus"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_mmbench_circular(tmp_path, model, mode):
    path = B.mmbench(tmp_path / "mmb")
    res, recs = run({"type": "mmbench", "name": f"mmb_{mode}", "data_file": path, "mode": mode}, model, tmp_path)
    # 3 unique questions (the 1e6 copy is skipped): 4 + 3 + 2 rotations; the tie question fails rotation 0
    assert len(recs) == 9
    assert res["metrics"]["circular_acc"] == pytest.approx(2 / 3) and res["metrics"]["vanilla_acc"] == pytest.approx(8 / 9)
    rot = {r["id"]: r for r in recs}
    assert rot["1-r1"]["options"] == ["three cats", "four dogs", "two cats"] and rot["1-r1"]["answer"] == "A"
    assert rot["1-r0"]["hint"] == "Count them." and rot["0-r0"]["hint"] == ""


def test_scienceqa_img(tmp_path):
    path = B.scienceqa(tmp_path / "sqa")
    res, recs = run({"type": "scienceqa", "name": "sqa", "data_file": path},
                    FakeVLM(B.VISION, {"Which bird is this?": "B", "Which animal?": "I am not sure"}), tmp_path)
    assert {r["id"] for r in recs} == {"5", "7"}  # test split, with an image
    assert res["metrics"] == {"acc": 0.5, "parse_failure": 0.5}
    # the fake's own answer "B." is a failure under LLaVA's rule (a bare letter or "B. text"), not under VLMEvalKit's
    res, _ = run({"type": "scienceqa", "name": "sqa2", "data_file": path}, FakeVLM(B.VISION), tmp_path)
    assert res["metrics"]["parse_failure"] == 1.0
    res, _ = run({"type": "scienceqa", "name": "sqa3", "data_file": path, "answer_parser": "vlmevalkit"},
                 FakeVLM(B.VISION), tmp_path)
    assert res["metrics"]["acc"] == 0.5


# --- diagnostics -----------------------------------------------------------------------------------------


def test_spec(tmp_path, model):
    root = B.spec(tmp_path / "SPEC")
    res, recs = run({"type": "spec", "name": "spec", "path": str(root)}, model, tmp_path, bs=2)
    m = res["metrics"]
    assert m["count/i2t"] == 1.0 and m["count/t2i"] == 1.0 and m["absolute_spatial/t2i"] == 0.0
    # unweighted over the six subsets: every i2t right; t2i wrong only in absolute_spatial
    assert m["i2t"] == 1.0 and m["t2i"] == pytest.approx(5 / 6) and res["score"] == pytest.approx(11 / 12)
    res, _ = run({"type": "spec", "name": "spec2", "path": str(root), "subsets": ["count", "absolute_spatial"]},
                 model, tmp_path, bs=2)
    assert res["metrics"]["t2i"] == 0.5 and res["score"] == 0.75
    t2i = next(r for r in recs if r["id"] == "count/t2i/0")
    assert t2i["scores"] == pytest.approx([-2.0, -0.1])


def test_winoground(tmp_path, model):
    path = B.winoground(tmp_path / "wino")
    res, recs = run({"type": "winoground", "name": "wino", "data_file": path}, model, tmp_path)
    assert res["metrics"] == {"text": 0.5, "image": 0.5, "group": 0.5}
    s = next(r for r in recs if r["id"] == "1")["scores"]
    assert s[0][0] == pytest.approx(-0.1) and s[1][0] == pytest.approx(-2.2 / 3)


def test_valse_svo_vsr(tmp_path, model):
    res, _ = run({"type": "valse", "name": "valse", "data_files": B.valse(tmp_path / "valse"),
                  "image_root": str(tmp_path / "valse" / "images")}, model, tmp_path)
    assert res["metrics"] == pytest.approx({"acc": 2 / 3, "piece=counting": 0.5, "piece=existence": 1.0,
                                            "acc_piece_mean": 0.75})
    res, _ = run({"type": "svo_probes", "name": "svo", "data_file": B.svo_probes(tmp_path / "svo"),
                  "image_root": str(tmp_path / "svo" / "img")}, model, tmp_path)
    assert res["metrics"] == pytest.approx({"acc": 2 / 3, "neg_type=obj": 1.0, "neg_type=subj": 1.0, "neg_type=verb": 0.0})
    res, recs = run({"type": "vsr", "name": "vsr", "data_file": B.vsr(tmp_path / "vsr"),
                     "image_root": str(tmp_path / "vsr" / "images")}, model, tmp_path)
    assert res["score"] == pytest.approx(2 / 3) and [r["pred"] for r in recs] == [1, 0, 0]


def test_spec_limit_keeps_both_directions_and_every_subset(tmp_path):
    import json

    from eval.runner import build_task

    for sub in ("existence", "count"):
        d = tmp_path / sub
        d.mkdir()
        entries = [{"query": f"q{i}", "keys": ["a", "b"], "label": 0} for i in range(5)]
        (d / "image2text.json").write_text(json.dumps(entries))
        (d / "text2image.json").write_text(json.dumps(entries))
    task = build_task({"type": "spec", "name": "spec", "path": str(tmp_path), "limit": 4,
                       "subsets": ["existence", "count"]})
    picked = {(it["subset"], it["direction"]) for it in task.limited_items()}
    assert picked == {(s, d) for s in ("existence", "count") for d in ("i2t", "t2i")}
