"""The VLM as an lm-eval (0.4.x) model named `vlm_ablate`.

lm-eval finds models only in its own registry (no plugin entry points), so the plain `lm_eval` CLI
does not see this one; use `python -m eval.lm_eval_cli --model vlm_ablate --model_args run=RUN_DIR
--tasks ...`, which imports this module (registering the model) and hands over to lm-eval's CLI.

Requests map onto `score` / `generate` with `chat_template=False` by default (lm-eval's contexts
are already formatted prompts; `chat_template=True` in model_args sends them as the user turn), and follow
lm-eval's `hf` model where it decides a number:
- loglikelihood: a context's trailing whitespace moves to the continuation (`LM._encode_pair`); consecutive
  requests that share a context and images are scored as one item, so a multiple-choice question computes its
  prefix once; `is_greedy` comes from the logits of that same forward (every continuation token is its
  position's argmax; our VLMs and `hf:` models both give it). `greedy_check=false` reports False without looking;
  a model whose `score` does not give `is_greedy` regenerates each continuation greedily to decide it (slow).
- generate_until: requests with the same generation kwargs run in batches of `batch_size`, longest context
  first; `until` stops decoding (a stopping criterion every step, `VLM.generate(stop_strings=)`) and the text is
  cut before the first stop string or the EOS text, as `hf` does; the text keeps its leading space (" 18").
Images (`visual`) go where the context holds `<image>`; missing placeholders are prepended.
"""
from __future__ import annotations

import json
from typing import Any

import lm_eval.models  # noqa: F401  (fill lm-eval's registry first, so get_model() still sees its own models)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from vlm.loading import load_vlm

IMAGE = "<image>"


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def _same_images(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _move_trailing_space(ctx: str, cont: str) -> tuple[str, str]:
    """lm-eval's `_encode_pair` rule: a context's trailing whitespace belongs to the continuation."""
    n = len(ctx) - len(ctx.rstrip())
    return (ctx[:-n], ctx[-n:] + cont) if n and ctx.strip() else (ctx, cont)


def _is_greedy_field(result: Any) -> bool | None:
    try:
        value = result["is_greedy"]
    except KeyError:
        return None
    return None if value is None else bool(value)


@register_model("vlm_ablate")
class VLMAblateLM(LM):
    MULTIMODAL = True

    def __init__(self, run: str | None = None, model: Any = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, greedy_check: bool | str = True, chat_template: bool | str = False,
                 **_: Any) -> None:
        super().__init__()
        if model is None or isinstance(model, str):
            model = load_vlm(run or model)
        self.model = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.greedy_check = _as_bool(greedy_check)
        self.chat = _as_bool(chat_template)

    @staticmethod
    def _split(args: tuple) -> tuple[str, Any, list | None]:
        ctx, second = args[0], args[1]
        aux = args[2] if len(args) > 2 else {}
        visuals = (aux or {}).get("visual")
        if visuals is not None and not isinstance(visuals, list):
            visuals = [visuals]
        if visuals:
            missing = len(visuals) - ctx.count(IMAGE)
            if missing > 0:
                ctx = IMAGE * missing + "\n" + ctx
        return ctx, second, visuals or None

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        parsed = []
        for r in requests:
            ctx, cont, vis = self._split(r.args)
            ctx, cont = _move_trailing_space(ctx, cont)
            parsed.append((ctx, cont, vis))
        groups: list[tuple[str, Any, list[int]]] = []
        for i, (ctx, _, vis) in enumerate(parsed):
            if groups and groups[-1][0] == ctx and _same_images(groups[-1][1], vis):
                groups[-1][2].append(i)
            else:
                groups.append((ctx, vis, [i]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for g in tqdm(range(0, len(groups), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = groups[g : g + self.batch_size]
            res = self.model.score([vis for _, vis, _ in chunk], [ctx for ctx, _, _ in chunk],
                                   [[parsed[i][1] for i in idx] for _, _, idx in chunk], chat_template=self.chat)
            for (ctx, vis, idx), rr in zip(chunk, res):
                for i, r in zip(idx, rr):
                    out[i] = (float(r["sum_logprob"]), self._is_greedy(ctx, vis, parsed[i][1], r))
        return out  # type: ignore[return-value]

    def _is_greedy(self, ctx: str, vis: Any, cont: str, result: Any) -> bool:
        """The score's own `is_greedy`; for a model that does not compute it, whether greedy decoding of the
        continuation's length reproduces it (text compare, one generation per continuation)."""
        if not self.greedy_check:
            return False
        greedy = _is_greedy_field(result)
        if greedy is not None:
            return greedy
        gen = self.model.generate([vis], [ctx], chat_template=self.chat, max_new_tokens=int(result["num_tokens"]))[0]
        return gen.strip() == cont.strip()

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the BOS token (no windowing: texts must fit the context)."""
        texts = [r.args[0] for r in requests]
        out = []
        for i in tqdm(range(0, len(texts), self.batch_size), disable=disable_tqdm, desc="loglikelihood_rolling"):
            chunk = texts[i : i + self.batch_size]
            res = self.model.score([None] * len(chunk), [""] * len(chunk), [[t] for t in chunk], chat_template=False)
            out += [float(r[0]["sum_logprob"]) for r in res]
        return out

    def _eos_text(self) -> str | None:
        tok = getattr(self.model, "tokenizer", None)
        eos = getattr(tok, "eos_token_id", None)
        return None if eos is None else tok.decode([eos], skip_special_tokens=False)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        parsed = [self._split(r.args) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kw, _) in enumerate(parsed):
            groups.setdefault(json.dumps(kw or {}, sort_keys=True, default=str), []).append(i)
        eos = self._eos_text()
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(dict(parsed[idx[0]][1] or {}), self.max_gen_toks)
                until = list(kwargs.pop("until", None) or [])
                stops = handle_stop_sequences(list(until), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                if not kwargs.get("do_sample"):
                    kwargs.pop("temperature", None)
                idx = sorted(idx, key=lambda i: -len(parsed[i][0]))  # longest first: padding and OOMs early
                for b in range(0, len(idx), self.batch_size):
                    chunk = idx[b : b + self.batch_size]
                    texts = self.model.generate([parsed[i][2] for i in chunk], [parsed[i][0] for i in chunk],
                                                chat_template=self.chat, max_new_tokens=max_new, batch_size=len(chunk),
                                                stop_strings=until, strip=False, **kwargs)
                    for i, text in zip(chunk, texts):
                        out[i] = postprocess_generated_text(text, stops, None)
                    bar.update(len(chunk))
        return out  # type: ignore[return-value]
