"""Any transformers image-text-to-text model as an evaluation model: `load_vlm("hf:<hub id or dir>")`.

The checkpoint is loaded with `AutoModelForImageTextToText` + `AutoProcessor`, and prompts go through the
processor's own chat template, so LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, Gemma 3 and the
other families the installed transformers registers run the eval tasks unchanged. `HFAutoVLM` has the
evaluation interface of our `VLM` (`generate`, `score`); it is not trainable by this framework.

Prompts hold `<image>` placeholders (as everywhere in this project). With `chat_template=True` a prompt
becomes one user message in HF's list-of-parts format: each `<image>` an `{"type": "image"}` part, the
text between them `{"type": "text"}` parts (whitespace at the seams stripped, as HF examples write them);
the processor then expands each image to the model's own image tokens. A prompt without placeholders
gets its images in front, as with our VLM. With `chat_template=False` the prompt is used verbatim, each
`<image>` replaced by the text the model's chat template writes for one image (`image_text`).

Scoring: each item's image+prompt prefix is run once, and its continuations are run as one batch on
copies of the prefix's KV cache, their inputs built as a decoding step of HF's generate builds them
(positions, M-RoPE rows, token types). A family whose `Family` entry says `kv_shared=False` is scored
with one full forward of prefix + continuation per continuation instead (the images re-encoded each
time). Both give the log-probs of the model's own full forward; tests/test_hf_auto.py checks this per
architecture. Encoder-decoder models (Florence-2, Pix2Struct, ...) are refused.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import jinja2
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm.errors import UserError
from vlm.model.vlm import ScoreResult, as_image_list, cut_at_stop

log = logging.getLogger(__name__)

IMAGE = "<image>"

# per-token inputs a processor may return beside input_ids (image vs text, or PaliGemma's prefix vs suffix)
_TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class Family:
    """What a model family does differently from the HF conventions this module assumes (by `model_type`).

    `continuation_token_type`: the `token_type_ids` value of scored continuation tokens, the value HF's
    generate gives new tokens (0 = text for Gemma 3 / Qwen2-VL; 1 = causal suffix for PaliGemma, whose
    prompt attends bidirectionally). `kv_shared`: continuations run on copies of the prefix's KV cache;
    False scores each continuation with one full forward of prefix + continuation instead.
    """

    continuation_token_type: int = 0
    kv_shared: bool = True


FAMILIES: dict[str, Family] = {
    "paligemma": Family(continuation_token_type=1),
}


def _split_prompt(prompt: str) -> list[dict[str, str]]:
    """`"<image>\\nWhat is it?"` → `[{"type": "image"}, {"type": "text", "text": "What is it?"}]`."""
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(prompt.split(IMAGE)):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts


class HFAutoVLM:
    """An HF image-text-to-text model with our evaluation interface (`generate`, `score`)."""

    def __init__(self, model: Any, processor: Any, name: str = "") -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise UserError(f"hf:{name}: {type(model).__name__} is an encoder-decoder model; hf: supports decoder-only "
                            "image-text-to-text models (LLaVA-NeXT, Qwen2-VL, Idefics3, Gemma 3, ...).")
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # batches are left-padded and masked; any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_type = str(model.config.model_type)
        self.family = FAMILIES.get(self.model_type, Family())
        self.image_token = IMAGE
        self.has_chat_template = bool(getattr(processor, "chat_template", None) or
                                      getattr(self.tokenizer, "chat_template", None))
        # what the eval tasks may read besides generate/score: `llm.tokenizer`, `llm.model` (option mining)
        self.llm = SimpleNamespace(tokenizer=self.tokenizer, model=model)
        self.template_takes_parts = True  # set by _image_text
        self.image_text = self._image_text()
        self._warned_no_template = False

    # ------------------------------------------------------------------ prompts
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _render_probe(self) -> str | None:
        """The chat template's rendering of [text "@@A@@", image, text "@@B@@"]; None for a template written for
        plain-string content only (it fails on a parts list, or prints it)."""
        msg = [{"role": "user", "content": [{"type": "text", "text": "@@A@@"}, {"type": "image"},
                                            {"type": "text", "text": "@@B@@"}]}]
        try:
            text = self.processor.apply_chat_template(msg, tokenize=False)
        except (TypeError, ValueError, jinja2.TemplateError):  # e.g. 'USER: ' + content
            return None
        return None if "'type'" in text else text

    def _image_text(self) -> str:
        """The text one image part becomes in the chat template (e.g. Qwen2-VL's vision_start/pad/end, found
        between the probe's markers), else the processor's image token."""
        token = getattr(self.processor, "image_token", None) or IMAGE
        text = self._render_probe() if self.has_chat_template else None
        self.template_takes_parts = text is not None or not self.has_chat_template
        if text and "@@A@@" in text and "@@B@@" in text:
            between = text[text.index("@@A@@") + 5:text.index("@@B@@")].strip()
            if token in between:
                return between
        return token

    def render(self, prompt: str, n_images: int, chat_template: bool) -> str:
        """The text the processor gets for one item (image placeholders in the model's own format)."""
        n = prompt.count(IMAGE)
        if n == 0 and n_images:
            prompt = (IMAGE + "\n") * n_images + prompt
        elif n != n_images:
            raise UserError(f"prompt has {n} {IMAGE} placeholders but {n_images} images were given: {prompt[:80]!r}. "
                            f"Put one {IMAGE} per image in the prompt (or none to prepend them).")
        if chat_template and not self.has_chat_template:
            if not self._warned_no_template:
                log.warning("hf:%s has no chat template; prompts are used verbatim (as with chat_template=False)", self.name)
                self._warned_no_template = True
            chat_template = False
        if not chat_template:
            return prompt.replace(IMAGE, self.image_text)
        if not self.template_takes_parts:
            raise UserError(f"hf:{self.name}: its chat template writes list-of-parts message content as a Python "
                            "list (it takes plain-string content only), so it cannot place images. Give the "
                            "checkpoint a multimodal chat template or evaluate with chat_template: false.")
        messages = [{"role": "user", "content": _split_prompt(prompt)}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, texts: list[str], images: list[list[Any]], chat_template: bool) -> Any:
        """Processor outputs (input ids with expanded image tokens, pixel values, ...) for a batch of items."""
        bos = self.tokenizer.bos_token
        # a rendered chat template already holds BOS, as in HF's apply_chat_template(tokenize=True)
        add_special = not (chat_template and self.has_chat_template and bos and all(t.startswith(bos) for t in texts))
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": len(texts) > 1, "add_special_tokens": add_special}
        if any(images):
            kwargs["images"] = images
        try:
            batch = self.processor(**kwargs)
        except ValueError as e:
            raise UserError(f"hf:{self.name}: the processor refused the input ({e}); e.g. a model that needs an "
                            "image with every prompt was given a text-only item") from e
        batch.pop("labels", None)  # PaliGemma's processor adds training labels
        if batch["input_ids"].shape[1] == 0:  # empty context (lm-eval's rolling log-likelihood): condition on BOS
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            batch["input_ids"] = torch.full((len(texts), 1), start, dtype=torch.long)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            for k in _TOKEN_TYPE_KEYS:
                if k in batch:
                    batch[k] = torch.zeros_like(batch["input_ids"])
        return batch.to(device=self.device, dtype=self.model.dtype)

    def _prepare(self, images: Sequence[Any], prompts: Sequence[str], chat_template: bool) -> tuple[list[str], list[list[Any]]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts")
        ims = [as_image_list(x) for x in images]
        return [self.render(p, len(im), chat_template) for p, im in zip(prompts, ims)], ims

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, images: Sequence[Any], prompts: Sequence[str], chat_template: bool = True,
                 max_new_tokens: int = 32, batch_size: int | None = None, stop_strings: Sequence[str] = (),
                 strip: bool = True, **generate_kwargs: Any) -> list[str]:
        """Greedy (by default) answers, one per prompt; `images[i]` is an image, a list of them, or None. The same
        contract as `VLM.generate`: one batch (or chunks of `batch_size`), decoding stops at a stop string and the
        answer is cut before it, `strip=False` keeps the text as decoded (lm-eval's leading space)."""
        texts, ims = self._prepare(images, prompts, chat_template)
        generate_kwargs.setdefault("do_sample", False)
        stops = [s for s in stop_strings if s]
        if stops:
            generate_kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        step = batch_size or max(len(texts), 1)
        answers: list[str] = []
        for start in range(0, len(texts), step):
            chunk_t, chunk_i = texts[start:start + step], ims[start:start + step]
            # processors take a batch whose items all have images or none do
            groups = [[k] for k in range(len(chunk_t))] if (any(chunk_i) and not all(chunk_i)) else [list(range(len(chunk_t)))]
            for g in groups:
                inputs = self.inputs([chunk_t[k] for k in g], [chunk_i[k] for k in g], chat_template)
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
                new = out[:, inputs["input_ids"].shape[1]:]
                answers.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        answers = [cut_at_stop(a, stops) for a in answers]
        return [a.strip() for a in answers] if strip else answers

    # ------------------------------------------------------------------ score
    def continuation_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"continuation {text!r} tokenises to nothing; scores need at least one token")
        return ids

    @torch.no_grad()
    def score(self, images: Sequence[Any], prompts: Sequence[str], continuations: Sequence[Sequence[str] | str],
              chat_template: bool = True, batch_size: int = 8, **_: Any) -> list[list[ScoreResult]]:
        """Log-likelihood of each continuation given its item's image(s) and prompt (see the module docstring).

        Returns, per item, one `ScoreResult` per continuation (a str continuation counts as a list of one);
        `batch_size` bounds the continuations run together.
        """
        if not (len(images) == len(prompts) == len(continuations)):
            raise ValueError(f"images ({len(images)}), prompts ({len(prompts)}) and continuations "
                             f"({len(continuations)}) differ in length")
        texts, ims = self._prepare(images, prompts, chat_template)
        results = []
        for text, im, conts in zip(texts, ims, continuations):
            conts = [conts] if isinstance(conts, str) else list(conts)
            toks = [self.continuation_ids(c) for c in conts]
            inputs = self.inputs([text], [im], chat_template)
            prefix = self._prefix(inputs) if self.family.kv_shared else None  # run once per item
            sums: list[tuple[float, bool]] = []
            for start in range(0, len(toks), batch_size):
                group = toks[start:start + batch_size]
                sums.extend(self._score_cached(inputs, prefix, group) if prefix else self._score_full(inputs, group))
            results.append([ScoreResult(s, s / len(t), len(t), is_greedy=g) for (s, g), t in zip(sums, toks)])
        return results

    def _cont_batch(self, toks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in toks)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(toks), width), pad, dtype=torch.long)
        mask = torch.zeros((len(toks), width), dtype=torch.long)
        for i, t in enumerate(toks):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _gather(logprobs: torch.Tensor, ids: torch.Tensor, toks: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log p(ids[i, t]), whether every ids[i, t] is the argmax) with `logprobs[i, t]` predicting
        token t of continuation i."""
        lp = logprobs.gather(-1, ids[..., None]).squeeze(-1)
        greedy = logprobs.argmax(-1) == ids
        return [(float(lp[i, :len(t)].sum()), bool(greedy[i, :len(t)].all())) for i, t in enumerate(toks)]

    def _continuation_inputs(self, inputs: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> dict[str, Any]:
        """Model inputs for continuation rows `ids` after the cached prefix, built the way a decoding step of
        HF's generate builds them for prefix + continuation: position ids of the whole sequence from
        `_prepare_position_ids_for_generation` (1-D, or M-RoPE rows for Qwen2-VL-like models), then
        `prepare_inputs_for_generation` slices them to the new tokens (and adds family offsets such as
        PaliGemma's 1-based positions). Continuation tokens are text, so their positions do not depend
        on which tokens they are."""
        n, width = ids.shape
        prefix_ids, prefix_mask = inputs["input_ids"], inputs["attention_mask"]
        token_type = self.family.continuation_token_type
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and torch.is_tensor(v)}
        full_ids = torch.cat([prefix_ids.expand(n, -1), ids], 1)
        full_mask = torch.cat([prefix_mask.expand(n, -1), mask], 1)
        types = {k: torch.cat([inputs[k].expand(n, -1), torch.full_like(ids, token_type)], 1)
                 for k in _TOKEN_TYPE_KEYS if k in inputs}
        one = {**kw, **{k: v[:1] for k, v in types.items()}, "input_ids": full_ids[:1],
               "attention_mask": torch.cat([prefix_mask, torch.ones_like(ids[:1])], 1)}
        positions = self.model._prepare_position_ids_for_generation(full_ids[:1], one)
        positions = positions.expand(*positions.shape[:-2], n, positions.shape[-1])
        return self.model.prepare_inputs_for_generation(
            full_ids, next_sequence_length=width, cache=cache, attention_mask=full_mask, position_ids=positions,
            use_cache=True, is_first_iteration=False, **types)

    def _prefix(self, inputs: Any) -> tuple[torch.Tensor, Any]:
        """The prefix's forward: log-probs of the token after it (each continuation's first) and its KV cache."""
        out = self.model(**inputs, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), -1), cache

    def _score_cached(self, inputs: Any, prefix: tuple[torch.Tensor, Any], toks: list[list[int]]) -> list[tuple[float, bool]]:
        """Continuations as one batch on a copy of the prefix's KV cache (the prefix itself is not run again)."""
        n = len(toks)
        first, cache = prefix
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n)
        ids, mask = self._cont_batch(toks)
        logits = self.model(**self._continuation_inputs(inputs, ids, mask, cache)).logits.float()
        logprobs = torch.cat([first[:, None].expand(n, -1, -1), torch.log_softmax(logits[:, :-1], -1)], 1)
        return self._gather(logprobs, ids, toks)

    def _score_full(self, inputs: Any, toks: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward of prefix + continuation per continuation (the images re-encoded each time)."""
        sums = []
        for t in toks:
            cont = torch.tensor([t], device=self.device)
            full = {k: v for k, v in inputs.items()}
            full["input_ids"] = torch.cat([inputs["input_ids"], cont], 1)
            full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], 1)
            for k in _TOKEN_TYPE_KEYS:
                if k in inputs:
                    full[k] = torch.cat([inputs[k], torch.full_like(cont, self.family.continuation_token_type)], 1)
            logits = self.model(**full).logits[0, -len(t) - 1:-1].float()
            sums.append(self._gather(torch.log_softmax(logits, -1)[None], cont, [t])[0])
        return sums


def load_hf_auto(spec: str, dtype: torch.dtype | str = "auto", device: str | None = None) -> HFAutoVLM:
    """Load `spec` (a local dir or a hub id) with AutoModelForImageTextToText + AutoProcessor; `dtype` "auto"
    keeps the checkpoint's own (bf16 for most hub VLMs), as HF recommends for inference."""
    try:
        processor = AutoProcessor.from_pretrained(spec)
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype)
    except (OSError, ValueError) as e:
        where = "a local directory" if Path(spec).exists() else "a hub id"
        raise UserError(f"cannot load hf:{spec} ({where}) as an image-text-to-text model: {e}. Give a directory "
                        "written by save_pretrained (model + processor) or a reachable hub id of a model that "
                        "AutoModelForImageTextToText registers.") from e
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UserError(f"hf:{spec}: AutoProcessor gave {type(processor).__name__}, not a multimodal processor "
                        "(no processor_config.json / preprocessor_config.json beside the model?)")
    if device:
        model = model.to(device)
    return HFAutoVLM(model, processor, name=spec)
