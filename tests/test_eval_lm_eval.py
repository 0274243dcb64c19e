"""The lm-eval adapter: request mapping, shared prefixes, images, stop sequences, agreement with lm-eval's own
`hf` model on a tiny random-weight Llama (log-likelihoods, is_greedy, batched generate_until with stop strings
and the leading space; with a tiny max_length: over-long contexts truncated, long documents scored in rolling
windows), image tokens kept through truncation, and a full `lm_eval.simple_evaluate` run of a local
multiple-choice task through the registered `vlm_ablate`."""
import itertools
import json

import pytest
import torch

pytest.importorskip("lm_eval")

import eval.lm_eval_adapter
from eval.lm_eval_adapter import VLMAblateLM
from fixtures_eval import builders as B
from fixtures_eval.fake_model import FakeVLM
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows
from vlm.errors import UserError


class KnowsFacts(FakeVLM):
    """Text-only knowledge for image-less requests; its scores carry no `is_greedy` (as an `hf:` model's)."""

    def see(self, image):
        return "paris is the capital of france" if image is None else super().see(image)

    def generate(self, images, prompts, chat_template=True, max_new_tokens=32, **_):
        return super().generate(images, prompts, chat_template, max_new_tokens)


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


def test_is_greedy_fallback_generate_until_and_rolling():
    """A model whose scores lack `is_greedy` gets it by greedy regeneration; stop strings cut the text; rolling
    windows are refused for a model without token-level access."""
    fake = KnowsFacts(B.VISION, answers={"Say it": "paris\n\nQ: next", "Again": "france"})
    lm = VLMAblateLM(model=fake)
    (lp, greedy), (_, not_greedy) = lm.loglikelihood([req("loglikelihood", "Again", " france"),
                                                       req("loglikelihood", "Again", " paris")])
    assert greedy is True and not_greedy is False
    out = lm.generate_until([req("generate_until", "Say it", {"until": ["\n\n"], "max_gen_toks": 5}),
                             req("generate_until", "Again", {"until": "Q:"})])
    assert out == ["paris", "france"]
    with pytest.raises(UserError, match="loglikelihood_rolling needs token-level access"):
        lm.loglikelihood_rolling([req("loglikelihood_rolling", "paris is big")])  # windows need the tokenizer


@pytest.fixture(scope="module")
def tiny():
    from vlm.testing import tiny_vlm

    return tiny_vlm("clip", "llama", "chatml", seed=1)


@pytest.fixture(scope="module")
def hf_lm(tiny):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny.language_model, tokenizer=tiny.tokenizer, batch_size=3, max_length=512)


def _greedy_continuations(model, n: int) -> list[tuple[str, str]]:
    """Contexts whose 2-token greedy continuation is printable ASCII (so it survives decode + re-encode)."""
    out = []
    for a, b, c in itertools.product(["the", "a", "of"], ["red", "blue", "one", "two"], ["question", "time", "bird"]):
        ctx = f"{a} {b} {c}"
        gen = model.generate([None], [ctx], chat_template=False, max_new_tokens=2, strip=False)[0]
        if gen.isascii() and gen.isprintable() and gen.strip():
            out.append((ctx, gen))
        if len(out) == n:
            return out
    raise AssertionError("no printable greedy continuations found")


def test_loglikelihood_and_is_greedy_match_lm_eval_hf(tiny, hf_lm):
    lm = VLMAblateLM(model=tiny, batch_size=3)
    reqs = []
    for ctx, gen in _greedy_continuations(tiny, 3):
        reqs += [req("loglikelihood", ctx, gen), req("loglikelihood", ctx, " paris"),
                 req("loglikelihood", ctx + " ", "18 apples")]  # trailing space of a context moves to the continuation
    calls = []
    tiny.generate, orig = (lambda *a, **k: calls.append(1) or orig(*a, **k)), tiny.generate
    try:
        ours = lm.loglikelihood(reqs)
    finally:
        del tiny.generate
    ref = hf_lm.loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert sum(g for _, g in ref) >= 3  # the greedy continuations are greedy for lm-eval too
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in ref], abs=1e-5)
    assert not calls, "is_greedy must come from the scoring forward, not from generating"


def test_generate_until_matches_lm_eval_hf_batched(tiny, hf_lm):
    ctxs = ["The capital of France is", "Question: 2 + 2 = ? Answer:", "Once upon a time", "the blue bird", "a two"]
    free = tiny.generate([None] * len(ctxs), ctxs, chat_template=False, max_new_tokens=8, strip=False)
    stop = free[1][3:5]  # a string the second generation reaches after a few tokens
    reqs = [req("generate_until", c, {"until": ["\n\n", stop], "max_gen_toks": 8}) for c in ctxs]
    reqs += [req("generate_until", ctxs[0], {"until": "Q:", "max_gen_toks": 5, "do_sample": False}),
             req("generate_until", ctxs[2], {"max_gen_toks": 3})]
    ours = VLMAblateLM(model=tiny, batch_size=3).generate_until(reqs)
    assert ours == hf_lm.generate_until(reqs)
    assert ours[1] == free[1][:3]
    assert any(o.startswith(" ") for o in ours)  # the leading space is kept (" 18", not "18")


def test_until_stops_decoding_early(tiny):
    lm = VLMAblateLM(model=tiny)
    ctx = "The capital of France is"
    free = tiny.generate([None], [ctx], chat_template=False, max_new_tokens=20, strip=False)[0]
    steps = []
    hook = tiny.language_model.register_forward_hook(lambda *_: steps.append(1))
    try:
        lm.generate_until([req("generate_until", ctx, {"until": [free[1:3]], "max_gen_toks": 20})])
        with_stop, steps[:] = len(steps), []
        lm.generate_until([req("generate_until", ctx, {"until": [], "max_gen_toks": 20})])
    finally:
        hook.remove()
    assert len(steps) >= 20 and with_stop <= len(steps) - 16  # 20 decoding steps (+ prefill forwards) vs 3-4


SHORT = 24  # max_length of the truncation tests: every context below is longer
WORDS = [" the", " red", " bird", " a", " one"]  # one token each, also when repeated (checked where it matters)


def _words(n: int, seed: int) -> str:
    return "".join(WORDS[(i * 7 + seed * 3 + i // 5) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def hf_short(tiny):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny.language_model, tokenizer=tiny.tokenizer, batch_size=3, max_length=SHORT)


def _long_greedy_requests(tiny, n: int) -> list:
    """(context of ~2-3 max_lengths, 2-token continuation that is greedy after the context's last SHORT - 1
    tokens, i.e. greedy under lm-eval's truncation) pairs, printable and split as lm-eval's _encode_pair splits."""
    tok, out = tiny.tokenizer, []
    for seed in range(40):
        ctx = "Q:" + _words(40 + seed, seed)
        ids = tok(ctx)["input_ids"]
        gen = tiny.language_model.generate(input_ids=torch.tensor([ids[-(SHORT - 1):]]), max_new_tokens=2,
                                           do_sample=False)[0, -2:].tolist()
        text = tok.decode(gen)
        if text.isascii() and text.isprintable() and text.strip() and tok(ctx + text)["input_ids"] == ids + gen:
            out.append((ctx, text))
        if len(out) == n:
            return out
    raise AssertionError("no printable greedy continuations found")


def test_long_context_loglikelihood_matches_lm_eval_hf(tiny, hf_short):
    """Context + continuation beyond max_length: lm-eval keeps the last max_length + 1 tokens (the continuation
    whole); ours must give the same log-likelihoods and is_greedy. Mixed with requests that fit, and with the
    edge cases: exactly max_length + 1 tokens, and a continuation of max_length tokens."""
    tok = tiny.tokenizer
    reqs = []
    for ctx, gen in _long_greedy_requests(tiny, 2):
        reqs += [req("loglikelihood", ctx, gen), req("loglikelihood", ctx, " red bird"),
                 req("loglikelihood", ctx + " ", "one a")]
    edge = "Q:" + _words(SHORT - 1 - len(tok("Q:")["input_ids"]), 3)
    assert len(tok(edge)["input_ids"]) + len(tok(" red bird", add_special_tokens=False)["input_ids"]) == SHORT + 1
    reqs += [req("loglikelihood", "the red", " bird"),  # fits: the shared-prefix score path
             req("loglikelihood", edge, " red bird"),
             req("loglikelihood", "Q: a", _words(SHORT, 1))]
    ours = VLMAblateLM(model=tiny, batch_size=3, max_length=SHORT).loglikelihood(reqs)
    ref = hf_short.loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert sum(g for _, g in ref) >= 2  # the greedy continuations are greedy for lm-eval too (after truncation)
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in ref], abs=1e-5)


def test_rolling_loglikelihood_matches_lm_eval_hf_windows(tiny, hf_short):
    """A document over >= 3 windows of max_length tokens (lm-eval's disjoint rolling windows) and one that fits
    one window: the same sums as lm-eval's hf model."""
    doc = "Once upon a time" + _words(3 * SHORT + 5, 2) + " the end."
    assert len(list(get_rolling_token_windows(tiny.tokenizer(doc)["input_ids"], 2, SHORT, 1))) >= 3
    reqs = [req("loglikelihood_rolling", doc), req("loglikelihood_rolling", "the red bird")]
    ours = VLMAblateLM(model=tiny, batch_size=2, max_length=SHORT).loglikelihood_rolling(reqs)
    assert ours == pytest.approx(hf_short.loglikelihood_rolling(reqs), abs=1e-4, rel=1e-6)


def test_generate_until_long_context_matches_lm_eval_hf(tiny, hf_short):
    """A context beyond max_length - max_gen_toks keeps its last max_length - max_gen_toks tokens (lm-eval's
    left truncation); batched with a context that fits."""
    ctxs = ["Question:" + _words(50, 4) + " Answer:", "The capital of France is", "Once" + _words(30, 1)]
    reqs = [req("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 6}) for c in ctxs]
    ours = VLMAblateLM(model=tiny, batch_size=2, max_length=SHORT).generate_until(reqs)
    assert ours == hf_short.generate_until(reqs)


def test_max_length_default_and_bad_values(tiny):
    assert VLMAblateLM(model=tiny).max_length == tiny.language_model.config.max_position_embeddings
    assert VLMAblateLM(model=tiny, max_length="64").max_length == 64  # model_args may give strings
    for bad in ("abc", 0, "-5", "1.5"):
        with pytest.raises(UserError, match="max_length=.* is not a positive whole number"):
            VLMAblateLM(model=tiny, max_length=bad)


def test_truncation_keeps_image_tokens(tiny):
    """An image request is cut at its oldest text tokens, never at its image tokens: the same numbers as the
    request written with only the kept text (checked token for token), on a model with room for all of it.
    Images + continuation beyond max_length: a UserError naming the request."""
    img, n_img = B.solid("red"), tiny.num_image_tokens
    head, tail, cont = _words(30, 1), _words(6, 2), " red bird"
    long_ctx, max_len = "Q:" + head + "<image>" + tail, n_img + 20
    budget = max_len + 1 - 2  # the continuation is 2 tokens
    kept_head = head.split(" ")[-(budget - n_img - 6):]
    short_ctx = " " + " ".join(kept_head) + "<image>" + tail
    tokens = eval.lm_eval_adapter._VLMTokens(tiny)
    long_ids, short_ids = tokens.prompt_ids(long_ctx, [img], False), tokens.prompt_ids(short_ctx, [img], False)
    first = long_ids.index(tiny.image_token_id)
    before, image, after = long_ids[:first], long_ids[first:first + n_img], long_ids[first + n_img:]
    assert image == [tiny.image_token_id] * n_img and len(after) == 6
    assert short_ids == before[-len(kept_head):] + image + after and len(short_ids) == budget
    lm, wide = VLMAblateLM(model=tiny, max_length=max_len), VLMAblateLM(model=tiny)
    both = lambda m, c: m.loglikelihood([req("loglikelihood", c, cont, {"visual": [img]})])  # noqa: E731
    assert both(lm, long_ctx) == [pytest.approx(both(wide, short_ctx)[0], abs=1e-5)]
    gen_budget = max_len - 4
    gen_ctx = " " + " ".join(head.split(" ")[-(gen_budget - n_img - 6):]) + "<image>" + tail
    assert len(tokens.prompt_ids(gen_ctx, [img], False)) == gen_budget
    gen = lambda m, c, k=4: m.generate_until([req("generate_until", c, {"max_gen_toks": k}, {"visual": [img]})])  # noqa
    assert gen(lm, long_ctx) == gen(wide, gen_ctx)
    named = Instance(request_type="loglikelihood", doc={}, arguments=(long_ctx, cont, {"visual": [img]}), idx=3,
                     metadata=("mytask", 7, 1))
    with pytest.raises(UserError, match=r"task 'mytask' doc 7 request 3: its 16 image tokens alone exceed"):
        VLMAblateLM(model=tiny, max_length=n_img).loglikelihood([named])
    with pytest.raises(UserError, match="max_gen_toks 36 leaves no room"):
        gen(lm, long_ctx, max_len)


def test_hf_model_long_inputs_match_lm_eval_hf():
    """An `hf:` model (tiny LLaVA-NeXT, whose tokenizer adds BOS): truncated loglikelihood, rolling windows and a
    trimmed generation context as lm-eval's hf model on the same weights; an image request is never cut."""
    from lm_eval.models.huggingface import HFLM
    from test_hf_auto import ARCHS
    from vlm.model.hf_auto import HFAutoVLM

    torch.manual_seed(0)
    model, proc = ARCHS["llava_next"]()
    hf_auto = HFAutoVLM(model.eval(), proc, name="tiny-llava-next")
    assert hf_auto.tokenizer("a")["input_ids"][0] == hf_auto.tokenizer.bos_token_id
    ref = HFLM(pretrained=model, tokenizer=hf_auto.tokenizer, backend="causal", batch_size=3, max_length=SHORT)
    ours = VLMAblateLM(model=hf_auto, batch_size=3, max_length=SHORT)
    ctx = "Q:" + _words(50, 1)
    ll = [req("loglikelihood", ctx, " red bird"), req("loglikelihood", ctx, " one"),
          req("loglikelihood", "Q: a", " the")]
    assert [lp for lp, _ in ours.loglikelihood(ll)] == pytest.approx([lp for lp, _ in ref.loglikelihood(ll)], abs=1e-5)
    rolling = [req("loglikelihood_rolling", "Once" + _words(3 * SHORT, 3))]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(ref.loglikelihood_rolling(rolling), abs=1e-4, rel=1e-6)
    gen = [req("generate_until", ctx, {"until": ["\n\n"], "max_gen_toks": 6}),
           req("generate_until", "Q: a", {"until": ["\n\n"], "max_gen_toks": 6})]
    assert ours.generate_until(gen) == ref.generate_until(gen)
    with pytest.raises(UserError, match="an image request of an hf: model cannot be cut"):
        ours.loglikelihood([req("loglikelihood", "<image>" + ctx, " red", {"visual": [B.solid("red")]})])


def test_cli_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    """lm-eval's CLI lets a UserError from the model propagate unchanged (checked by hand: `python -m
    eval.lm_eval_cli --model vlm_ablate --model_args run=/no/such/run --tasks arc_easy` printed its traceback);
    ours prints it as one line, exit 2. lm-eval's own CLI is stood in for: indexing its tasks takes ~20 s."""
    from eval import lm_eval_cli

    monkeypatch.setattr(lm_eval_cli, "cli_evaluate", lambda: VLMAblateLM(run="/no/such/run"))
    assert lm_eval_cli.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load a VLM from '/no/such/run'") and err.count("\n") == 1


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
