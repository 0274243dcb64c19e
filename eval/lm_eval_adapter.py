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
- `max_length` (model_args; default: the LLM config's `n_positions` / `max_position_embeddings` / `n_ctx`, else
  the tokenizer's, else 2048, lm-eval's `resolve_max_length`): a loglikelihood request whose context +
  continuation exceed it keeps its last `max_length + 1` tokens (the oldest context tokens dropped, the last
  token not fed), a generate_until context keeps its last `max_length - max_gen_toks` tokens, as `hf` does.
  Image tokens are never dropped (the oldest text tokens go instead); a request whose image tokens and
  continuation (or generation room) alone exceed `max_length` is a UserError naming it.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens (context 1 token, the first
  window conditioned on BOS, else EOS), each scored as a loglikelihood request, summed, as `hf` does.
Images (`visual`) go where the context holds `<image>`; missing placeholders are prepended.
Truncation and rolling windows need token-level access to the model: this project's `VLM` (`hf-llava:` included)
and `hf:` models, whose image requests are never cut (their image tokens are model-specific: a UserError instead).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (fill lm-eval's registry first, so get_model() still sees its own models)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from vlm.errors import UserError
from vlm.loading import load_vlm
from vlm.model.hf_auto import HFAutoVLM
from vlm.model.vlm import VLM

log = logging.getLogger(__name__)

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


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n <= 0 or str(value).strip() != str(n):
        raise UserError(f"vlm_ablate model_args: {name}={value!r} is not a positive whole number of tokens; "
                        f"e.g. {name}=2048.")
    return n


def _name(request: Any) -> str:
    """A request as lm-eval's logs name it (task, document, request index)."""
    return (f"task {getattr(request, 'task_name', None)!r} doc {getattr(request, 'doc_id', None)} "
            f"request {getattr(request, 'idx', None)}")


def keep_last(ids: list[int], budget: int, image_id: int | None, where: str) -> list[int]:
    """`ids` cut to `budget` tokens by dropping its oldest text tokens; image tokens are always kept (lm-eval's
    left truncation, which only ever sees text, generalised to image requests)."""
    if len(ids) <= budget:
        return ids
    n_image = sum(t == image_id for t in ids) if image_id is not None else 0
    if n_image > budget:
        raise UserError(f"lm-eval {where}: its {n_image} image tokens alone exceed the {budget} tokens left for "
                        "the context by max_length; raise max_length (model_args) or give fewer images.")
    drop = len(ids) - budget
    out = []
    for t in ids:
        if drop and t != image_id:
            drop -= 1
        else:
            out.append(t)
    return out


def _right_padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class _VLMTokens:
    """Token-level access to this project's `VLM`: the ids `score` / `generate` feed it, and a forward / a
    generation from given ids (for requests lm-eval truncates, and rolling windows). `image_id`: the token
    that holds image features (never cut)."""

    def __init__(self, model: VLM) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.image_id: int | None = model.image_token_id
        self.config = model.language_model.config
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt_ids(self, prompt: str, images: list | None, chat: bool) -> list[int]:
        return self.model._prompt_ids(prompt, len(images or []), chat)

    def continuation_ids(self, text: str) -> list[int]:
        return self.model._continuation_ids(text)

    def _embeds(self, ids: torch.Tensor, images: list[list | None]) -> torch.Tensor:
        flat = [im for group in images for im in (group or [])]
        return self.model.embed(ids, self.model.encode_images(self.model.preprocess(flat)) if flat else None)

    @torch.no_grad()
    def logits(self, rows: list[list[int]], images: list[list | None]) -> torch.Tensor:
        """Logits of right-padded `rows` (no mask: padding comes after every real token, as in `hf`)."""
        ids = _right_padded(rows, self.pad_id, self.model.device)
        return self.model.language_model(inputs_embeds=self._embeds(ids, images)).logits

    @torch.no_grad()
    def generate(self, rows: list[list[int]], images: list[list | None], max_new_tokens: int,
                 stop_strings: Sequence[str], **kwargs: Any) -> list[str]:
        """`VLM.generate` from prompt ids: left-padded, masked, the same EOS ids and stop strings."""
        m = self.model
        ids, mask = _left_padded(rows, self.pad_id, m.device)
        eos = {self.tokenizer.eos_token_id, *getattr(m.llm, "stop_token_ids", [])}
        gen_eos = m.language_model.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        eos.discard(None)
        stops = [s for s in stop_strings if s]
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        kwargs.setdefault("do_sample", False)
        out = m.language_model.generate(inputs_embeds=self._embeds(ids, images), attention_mask=mask,
                                        max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                                        pad_token_id=self.pad_id, **kwargs)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


class _HFAutoTokens:
    """Token-level access to an `hf:` model (`HFAutoVLM`), text only: its image tokens are family-specific
    (Qwen2-VL's vision start/end and M-RoPE rows, ...), so an image request is never cut (`image_id` None)."""

    image_id: int | None = None

    def __init__(self, model: HFAutoVLM) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = model.model.config
        self.pad_id = self.tokenizer.pad_token_id

    def prompt_ids(self, prompt: str, images: list | None, chat: bool) -> list[int]:
        ims = list(images or [])
        return self.model.inputs([self.model.render(prompt, len(ims), chat)], [ims], chat)["input_ids"][0].tolist()

    def continuation_ids(self, text: str) -> list[int]:
        return self.model.continuation_ids(text)

    @torch.no_grad()
    def logits(self, rows: list[list[int]], images: list[list | None]) -> torch.Tensor:
        assert not any(images), "hf: image requests are never cut"
        return self.model.model(input_ids=_right_padded(rows, self.pad_id, self.model.device)).logits

    @torch.no_grad()
    def generate(self, rows: list[list[int]], images: list[list | None], max_new_tokens: int,
                 stop_strings: Sequence[str], **kwargs: Any) -> list[str]:
        """`HFAutoVLM.generate` from prompt ids (text only)."""
        assert not any(images), "hf: image requests are never cut"
        ids, mask = _left_padded(rows, self.pad_id, self.model.device)
        stops = [s for s in stop_strings if s]
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        kwargs.setdefault("do_sample", False)
        out = self.model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def _token_access(model: Any) -> _VLMTokens | _HFAutoTokens | None:
    if isinstance(model, VLM):
        return _VLMTokens(model)
    if isinstance(model, HFAutoVLM):
        return _HFAutoTokens(model)
    return None


@register_model("vlm_ablate")
class VLMAblateLM(LM):
    MULTIMODAL = True

    def __init__(self, run: str | None = None, model: Any = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, max_length: int | str | None = None, greedy_check: bool | str = True,
                 chat_template: bool | str = False, **_: Any) -> None:
        super().__init__()
        if model is None or isinstance(model, str):
            model = load_vlm(run or model)
        self.model = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.greedy_check = _as_bool(greedy_check)
        self.chat = _as_bool(chat_template)
        self.tokens = _token_access(model)
        if max_length is not None:
            self.max_length: int | None = _positive_int(max_length, "max_length")
        elif self.tokens is not None:
            self.max_length = resolve_max_length(self.tokens.config, self.tokens.tokenizer)
        else:
            self.max_length = None

    def _need_tokens(self, what: str) -> _VLMTokens | _HFAutoTokens:
        if self.tokens is None or self.max_length is None:
            raise UserError(f"vlm_ablate: {what} needs token-level access to the model, which "
                            f"{type(self.model).__name__} does not give (this project's VLMs and hf: models do).")
        return self.tokens

    def _keep_last(self, ids: list[int], budget: int, images: list | None, where: str) -> list[int]:
        if images and self.tokens.image_id is None and len(ids) > budget:
            raise UserError(f"lm-eval {where}: its {len(ids)} context tokens exceed the {budget} that max_length "
                            f"{self.max_length} leaves, and an image request of an hf: model cannot be cut (its image "
                            "tokens are model-specific); raise max_length (model_args) if the model allows it.")
        return keep_last(ids, budget, self.tokens.image_id, where)

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

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        parsed = []
        for r in requests:
            ctx, cont, vis = self._split(r.args)
            ctx, cont = _move_trailing_space(ctx, cont)
            parsed.append((ctx, cont, vis))
        long = self._too_long(requests, parsed)
        groups: list[tuple[str, Any, list[int]]] = []
        for i, (ctx, _, vis) in enumerate(parsed):
            if i in long:
                continue
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
        if long:
            log.warning("vlm_ablate: %d of %d loglikelihood requests exceed max_length %d; their oldest context "
                        "tokens are dropped (as lm-eval's hf model does)", len(long), len(requests), self.max_length)
            idx = sorted(long)
            for i, (lp, greedy) in zip(idx, self._score_tokens([long[i] for i in idx], [parsed[i][2] for i in idx])):
                out[i] = (lp, greedy if self.greedy_check else False)
        return out  # type: ignore[return-value]

    def _too_long(self, requests: list, parsed: list) -> dict[int, tuple[list[int], list[int]]]:
        """Requests whose context + continuation exceed max_length -> (their kept context ids, continuation ids).
        A request of exactly max_length + 1 tokens keeps all of them but goes here too: its forward must not feed
        the last token (position max_length)."""
        if self.tokens is None or self.max_length is None:
            return {}
        n, long = self.max_length, {}
        prev: tuple[str, Any, list[int]] | None = None
        for i, (r, (ctx, cont, vis)) in enumerate(zip(requests, parsed)):
            if prev is None or prev[0] != ctx or not _same_images(prev[1], vis):
                prev = (ctx, vis, self.tokens.prompt_ids(ctx, vis, self.chat))
            ctx_ids, cont_ids = prev[2], self.tokens.continuation_ids(cont)
            if len(ctx_ids) + len(cont_ids) <= n:
                continue
            if not cont_ids:
                raise UserError(f"lm-eval {_name(r)}: continuation {cont!r} tokenises to nothing")
            if len(cont_ids) > n:
                raise UserError(f"lm-eval {_name(r)}: its continuation has {len(cont_ids)} tokens, more than "
                                f"max_length {n}; raise max_length (model_args) if the model allows it.")
            long[i] = (self._keep_last(ctx_ids, n + 1 - len(cont_ids), vis, _name(r)), cont_ids)
        return long

    def _score_tokens(self, pairs: list[tuple[list[int], list[int]]], images: list) -> list[tuple[float, bool]]:
        """(sum log p(continuation), every token its position's argmax) for (context ids, continuation ids)
        pairs, fed as context + continuation minus its last token, in batches of `batch_size`, longest first."""
        tok = self._need_tokens("scoring from token ids")
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
            logits = tok.logits(rows, [images[i] for i in chunk])
            for i, row, lg in zip(chunk, rows, logits):
                cont = torch.tensor(pairs[i][1], device=lg.device)
                lp = torch.log_softmax(lg[len(row) - len(cont) : len(row)].float(), dim=-1)
                out[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
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
        """Sum over lm-eval's disjoint rolling windows of `max_length` tokens (`hf`'s rule: the text encoded with
        the tokenizer's special tokens unless it starts with BOS text; the first window conditioned on BOS, or EOS
        where there is none)."""
        tok = self._need_tokens("loglikelihood_rolling")
        tz = tok.tokenizer
        prefix = tz.bos_token_id if tz.bos_token_id is not None else tz.eos_token_id
        pairs, owner = [], []
        for k, r in enumerate(tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling")):
            text = r.args[0]
            ids = tz(text, add_special_tokens=False)["input_ids"] if has_bos_prefix(text, tz.decode(prefix)) \
                else tz(text)["input_ids"]
            for window in get_rolling_token_windows(ids, prefix_token=prefix, max_seq_len=self.max_length,
                                                    context_len=1):
                pairs.append(make_disjoint_window(window))
                owner.append(k)
        sums: list[float] = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._score_tokens(pairs, [None] * len(pairs))):
            sums[k] += lp
        return sums

    # ------------------------------------------------------------------ generate_until
    def _eos_text(self) -> str | None:
        tok = getattr(self.model, "tokenizer", None)
        eos = getattr(tok, "eos_token_id", None)
        return None if eos is None else tok.decode([eos], skip_special_tokens=False)

    def _trimmed_contexts(self, requests: list, parsed: list, idx: list[int], max_new: int) -> dict[int, list[int]]:
        """Requests in `idx` whose context exceeds `max_length - max_gen_toks` -> their kept context ids."""
        if self.tokens is None or self.max_length is None:
            return {}
        budget = self.max_length - max_new
        if budget <= 0:
            raise UserError(f"lm-eval {_name(requests[idx[0]])}: max_gen_toks {max_new} leaves no room for the "
                            f"context in max_length {self.max_length}; lower max_gen_toks or raise max_length.")
        out = {}
        for i in idx:
            ids = self.tokens.prompt_ids(parsed[i][0], parsed[i][2], self.chat)
            if len(ids) > budget:
                out[i] = self._keep_last(ids, budget, parsed[i][2], _name(requests[i]))
        return out

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
                trimmed = self._trimmed_contexts(requests, parsed, idx, max_new)
                if trimmed:
                    log.warning("vlm_ablate: %d generate_until contexts exceed max_length - max_gen_toks = %d; "
                                "their oldest tokens are dropped (as lm-eval's hf model does)", len(trimmed),
                                self.max_length - max_new)
                for part in ([i for i in idx if i not in trimmed], [i for i in idx if i in trimmed]):
                    part = sorted(part, key=lambda i: -len(parsed[i][0]))  # longest first: padding and OOMs early
                    for b in range(0, len(part), self.batch_size):
                        chunk = part[b : b + self.batch_size]
                        if chunk[0] in trimmed:
                            texts = self.tokens.generate([trimmed[i] for i in chunk], [parsed[i][2] for i in chunk],
                                                         max_new, until, **kwargs)
                        else:
                            texts = self.model.generate([parsed[i][2] for i in chunk], [parsed[i][0] for i in chunk],
                                                        chat_template=self.chat, max_new_tokens=max_new,
                                                        batch_size=len(chunk), stop_strings=until, strip=False,
                                                        **kwargs)
                        for i, text in zip(chunk, texts):
                            out[i] = postprocess_generated_text(text, stops, None)
                        bar.update(len(chunk))
        return out  # type: ignore[return-value]
