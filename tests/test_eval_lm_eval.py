"""The lm-eval adapter: request mapping, shared prefixes, images, stop sequences, and a full
`lm_eval.simple_evaluate` run of a local multiple-choice task through the registered `vlm_ablate`."""
import json

import pytest

pytest.importorskip("lm_eval")

import eval.lm_eval_adapter
from eval.lm_eval_adapter import VLMAblateLM
from fixtures_eval import builders as B
from fixtures_eval.fake_model import FakeVLM
from lm_eval.api.instance import Instance


class KnowsFacts(FakeVLM):
    """Text-only knowledge for image-less requests."""

    def see(self, image):
        return "paris is the capital of france" if image is None else super().see(image)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_groups_shared_context_and_adds_images():
    fake = KnowsFacts(B.VISION)
    lm = VLMAblateLM(model=fake, greedy_check=False)
    img = B.solid("red")
    reqs = [req("loglikelihood", "Capital of France?", " paris"), req("loglikelihood", "Capital of France?", " rome"),
            req("loglikelihood", "What bird?", " red cardinal", {"visual": [img]}),
            req("loglikelihood", "What bird?", " blue jay", {"visual": [img]})]
    seen = []
    orig = fake.score
    fake.score = lambda ims, ps, cs, chat_template: seen.append((ps, cs, chat_template)) or orig(ims, ps, cs, chat_template)
    out = lm.loglikelihood(reqs)
    assert [o[0] for o in out] == pytest.approx([-0.1, -2.0, -0.2, -4.0])
    assert seen == [(["Capital of France?", "<image>\nWhat bird?"], [[" paris", " rome"], [" red cardinal", " blue jay"]], False)]
    assert fake.calls["continuations"] == 4


def test_is_greedy_generate_until_and_rolling():
    fake = KnowsFacts(B.VISION, answers={"Say it": "paris\n\nQ: next", "Again": "france"})
    lm = VLMAblateLM(model=fake)
    (lp, greedy), (_, not_greedy) = lm.loglikelihood([req("loglikelihood", "Again", " france"),
                                                       req("loglikelihood", "Again", " paris")])
    assert greedy is True and not_greedy is False
    out = lm.generate_until([req("generate_until", "Say it", {"until": ["\n\n"], "max_gen_toks": 5}),
                             req("generate_until", "Again", {"until": "Q:"})])
    assert out == ["paris", "france"]
    assert lm.loglikelihood_rolling([req("loglikelihood_rolling", "paris is big")]) == pytest.approx([-2.2])


def test_simple_evaluate_with_registered_model(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in [
        {"q": "The capital of France is", "choices": ["paris", "rome"], "label": 0},
        {"q": "The capital of Italy is", "choices": ["paris", "rome"], "label": 1}]))
    (tmp_path / "capitals.yaml").write_text(
        "task: capitals\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    monkeypatch.setattr(eval.lm_eval_adapter, "load_vlm", lambda spec: KnowsFacts(B.VISION))
    res = simple_evaluate(model="vlm_ablate", model_args="run=RUN,greedy_check=false", tasks=["capitals"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    # the fake knows only "paris ... france": item 1 right, item 2 wrong
    assert res["results"]["capitals"]["acc,none"] == 0.5
