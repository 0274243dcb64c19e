"""The VLM as an lm-eval (0.4.x) model named `vlm_ablate`.

lm-eval finds models only in its own registry (no plugin entry points), so the plain `lm_eval` CLI
does not see this one; use `python -m eval.lm_eval_cli --model vlm_ablate --model_args run=RUN_DIR
--tasks ...`, which imports this module (registering the model) and hands over to lm-eval's CLI.

Requests map onto `score` / `generate` with `chat_template=False` by default (lm-eval's contexts
are already formatted prompts; `chat_template=True` in model_args sends them as the user turn).
Consecutive loglikelihood requests that share a context and images are scored as one item, so a
multiple-choice question computes its prefix once. Images (`visual`) go where the context holds
`<image>`; missing placeholders are prepended.
"""
from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (fill lm-eval's registry first, so get_model() still sees its own models)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from vlm.loading import load_vlm

IMAGE = "<image>"


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def _same_images(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


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
        parsed = [self._split(r.args) for r in requests]
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
                    out[i] = (float(r["sum_logprob"]), self._is_greedy(ctx, vis, parsed[i][1], r["num_tokens"]))
        return out  # type: ignore[return-value]

    def _is_greedy(self, ctx: str, vis: Any, cont: str, num_tokens: int) -> bool:
        """Whether greedy decoding of `num_tokens` tokens reproduces the continuation (text compare)."""
        if not self.greedy_check:
            return False
        gen = self.model.generate([vis], [ctx], chat_template=self.chat, max_new_tokens=int(num_tokens))[0]
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

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            ctx, kw, vis = self._split(r.args)
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = self.model.generate([vis], [ctx], chat_template=self.chat,
                                       max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)))[0]
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out
