"""The VLM: a vision encoder, a connector and a causal LM, spliced at image placeholder tokens.

Image features enter the LLM the way HF's `modeling_llava.py` does it: the prompt holds one
`<image>` token id per image *feature*, i.e. each placeholder is expanded to N' copies before the
forward pass (`expand_image_tokens`), and the projected features are scattered into those
positions in order (`masked_scatter`). Zero, one or several images per sample and text-only
samples in the same batch all follow from that one rule.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from connectors import build_connector, check_connector
from encoders import build_encoder
from vlm.config import check_keys
from vlm.errors import UserError
from vlm.model.chat import tokenize_prompt
from vlm.model.llm import build_llm, check_llm_config

IGNORE_INDEX = -100


@dataclass
class ScoreResult:
    """Log-likelihood of one continuation given its item's image(s) and prompt. `is_greedy`: every continuation
    token is the argmax of its predicting logits (lm-eval's `is_greedy`); None where a model does not compute it."""

    sum_logprob: float
    mean_logprob: float
    num_tokens: int
    is_greedy: bool | None = None

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {"sum_logprob": self.sum_logprob, "mean_logprob": self.mean_logprob, "num_tokens": self.num_tokens,
                "is_greedy": self.is_greedy}

    def __getitem__(self, key: str) -> float | int | bool | None:
        return self.as_dict()[key]


@dataclass
class LabelLoss:
    """What `VLM.forward(..., label_loss_sum=True)` returns."""

    loss: torch.Tensor
    num_tokens: int


def _plain_lm_head(lm: nn.Module) -> bool:
    """True when logits are just `lm_head(decoder(...))` (optionally soft-capped), so the head can be applied to
    the labelled positions only; models that rescale logits in their forward go through the full forward."""
    cfg = lm.config
    rescaled = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling", "output_multiplier"))
    return not rescaled and lm.get_output_embeddings() is not None and hasattr(lm, "get_decoder")


def expand_image_tokens(
    input_ids: Sequence[int], labels: Sequence[int] | None, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int] | None]:
    """Repeat every image placeholder id `num_image_tokens` times (labels there become IGNORE_INDEX)."""
    ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    for i, tok in enumerate(input_ids):
        if tok == image_token_id:
            ids.extend([tok] * num_image_tokens)
            if out_labels is not None:
                out_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids.append(tok)
            if out_labels is not None:
                out_labels.append(labels[i])
    return ids, out_labels


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens, so left and right padding give equal results."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def as_image_list(item: Any) -> list[Any]:
    """An item's images: one image, a list of them, or None -> a list."""
    if item is None:
        return []
    if isinstance(item, (list, tuple)):
        return list(item)
    return [item]


class VLM(nn.Module):
    """Vision encoder → connector → causal LM.

    Submodules are named by the freeze-policy modules: `encoder` (vision), `connector`,
    `language_model` (llm). `llm` keeps the adapter with the tokenizer.
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module, llm: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.language_model = llm.model
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.image_token = llm.image_token
        self.image_token_id = int(llm.image_token_id)
        self.num_image_tokens = int(connector.num_output_tokens)

    # ------------------------------------------------------------------ images
    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    def preprocess(self, images: Sequence[Any]) -> Any:
        """PIL images → the encoder's pixel input (its own transform)."""
        pixels = self.encoder.preprocess(list(images))
        return _to_device(pixels, self.device)

    def encoder_features(self, pixels: Any) -> torch.Tensor:
        """Raw encoder tokens `[B, N, Dv]` (what the frozen-encoder feature cache stores)."""
        return self.encoder(pixels)

    def encode_images(self, pixels: Any = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Projected image tokens `[B, N', Dllm]` from pixels or from cached encoder features."""
        if image_features is None:
            image_features = self.encoder_features(pixels)
        proj_dtype = next(self.connector.parameters()).dtype
        projected = self.connector(image_features.to(proj_dtype))
        return projected.to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n_slots = int(mask.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"{n_slots} image placeholder tokens in the batch but {n_feats} image features "
                f"({0 if image_embeds is None else image_embeds.shape[0]} images × {self.num_image_tokens} tokens); "
                "expand each <image> with expand_image_tokens and pass one image per placeholder"
            )
        if n_slots:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: Any = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        label_loss_sum: bool = False,
        **kwargs: Any,
    ) -> Any:
        """`input_ids` hold N' image tokens per image; `pixels`/`image_features` hold the images in order.

        With `label_loss_sum=True` (training), returns `LabelLoss(loss=summed next-token cross-entropy over
        labelled positions, num_tokens)` and projects to the vocabulary only where a label is: image and
        prompt tokens, usually most of a LLaVA sequence, never pay for the LM head.
        """
        image_embeds = None
        if pixels is not None or image_features is not None:
            image_embeds = self.encode_images(pixels, image_features)
        inputs_embeds = self.embed(input_ids, image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        if label_loss_sum:
            if labels is None:
                raise ValueError("label_loss_sum=True needs labels")
            return self._label_loss_sum(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    def _label_loss_sum(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        labels: torch.Tensor, **kwargs: Any) -> "LabelLoss":
        lm = self.language_model
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not _plain_lm_head(lm):
            logits = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, **kwargs).logits[:, :-1][keep].float()
        else:
            hidden = lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            cap = getattr(lm.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
        loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        return LabelLoss(loss=loss, num_tokens=int(keep.sum()))

    # ------------------------------------------------------------------ prompts
    def _prompt_ids(self, prompt: str, n_images: int, chat_template: bool) -> list[int]:
        n_placeholders = prompt.count(self.image_token)
        if n_placeholders == 0 and n_images:
            prompt = (self.image_token + "\n") * n_images + prompt
        elif n_placeholders != n_images:
            raise UserError(
                f"prompt has {n_placeholders} {self.image_token} placeholders but {n_images} images were given: "
                f"{prompt[:80]!r}. Put one {self.image_token} per image in the prompt (or none to prepend them)."
            )
        ids = tokenize_prompt(self.tokenizer, prompt, chat_template=chat_template)
        if not ids:
            # An empty context (rolling log-likelihood of a text): condition on BOS, or EOS as lm-eval does.
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            ids = [start]
        if ids.count(self.image_token_id) != n_images:
            raise UserError(f"the tokenizer split {self.image_token!r} in prompt {prompt[:80]!r}; it must be one special token")
        return expand_image_tokens(ids, None, self.image_token_id, self.num_image_tokens)[0]

    def _continuation_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _image_embeds_for(self, images: list[Any]) -> torch.Tensor | None:
        if not images:
            return None
        return self.encode_images(self.preprocess(images))

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        chat_template: bool = True,
        max_new_tokens: int = 32,
        batch_size: int | None = None,
        stop_strings: Sequence[str] = (),
        strip: bool = True,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy (by default) answers, one per prompt; `images[i]` is an image, a list of them, or None.

        The prompts run as one batch (or chunks of `batch_size`), decoded on the KV cache by HF `generate`; greedy
        answers equal those of one prompt at a time. Prompts that pass the same image objects and whose ids agree up
        to and including their last image token share that prefix: the vision tower and the LLM run on it once per
        distinct prefix, its cache is copied to each prompt, and only the rest of each prompt is prefilled
        (`_generate_shared`). `stop_strings`: decoding of an answer stops once it holds one of them (a stopping
        criterion, checked every step), and the answer is cut before the first. `strip=False` keeps the text as
        decoded (a leading space included, as lm-eval's `hf` model returns it).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts")
        generate_kwargs.setdefault("do_sample", False)
        eos = {self.tokenizer.eos_token_id} | set(getattr(self.llm, "stop_token_ids", []))
        eos |= set(_as_list(self.language_model.generation_config.eos_token_id))
        eos.discard(None)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos)
        stops = [s for s in stop_strings if s]
        if stops:
            generate_kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        generate_kwargs.update(max_new_tokens=max_new_tokens, eos_token_id=sorted(eos), pad_token_id=pad_id)
        step = batch_size or max(len(prompts), 1)
        answers: list[str] = []
        for start in range(0, len(prompts), step):
            chunk_images = [as_image_list(x) for x in images[start:start + step]]
            seqs = [self._prompt_ids(p, len(im), chat_template) for p, im in zip(prompts[start:start + step], chunk_images)]
            splits = [self._prefix_split(s, len(im)) for s, im in zip(seqs, chunk_images)]
            shared = [i for i, k in enumerate(splits) if k is not None]
            alone = [i for i, k in enumerate(splits) if k is None]
            chunk: dict[int, str] = {}
            if shared:
                chunk.update(zip(shared, self._generate_shared([seqs[i] for i in shared], [splits[i] for i in shared],
                                                               [chunk_images[i] for i in shared], generate_kwargs)))
            if alone:
                chunk.update(zip(alone, self._generate_whole([seqs[i] for i in alone], [chunk_images[i] for i in alone],
                                                             generate_kwargs)))
            answers.extend(chunk[i] for i in range(len(seqs)))
        answers = [cut_at_stop(a, stops) for a in answers]
        return [a.strip() for a in answers] if strip else answers

    def _prefix_split(self, ids: list[int], n_images: int) -> int | None:
        """Where a prompt's shareable prefix ends: after its last image token (the first token for a text-only
        prompt); None when nothing would be left to prefill after it (the prompt ends with an image)."""
        k = max(i for i, t in enumerate(ids) if t == self.image_token_id) + 1 if n_images else 1
        return k if k < len(ids) else None

    def _generate_whole(self, seqs: list[list[int]], images: list[list[Any]], gen: dict[str, Any]) -> list[str]:
        """One left-padded batch of whole prompts, image features spliced in, through HF `generate`."""
        ids, mask = self._left_pad(seqs)
        embeds = self.embed(ids, self._image_embeds_for([im for group in images for im in group]))
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _generate_shared(self, seqs: list[list[int]], splits: list[int], images: list[list[Any]],
                         gen: dict[str, Any]) -> list[str]:
        """`seqs[i][:splits[i]]` is prompt i's prefix (its images inside it), the rest its suffix; splitting one
        tokenisation of the whole prompt makes prefix + suffix the prompt's ids by construction.

        Prompts with the same image objects and the same prefix ids form a group. The vision tower runs once on the
        distinct image objects, the LLM once on each group's prefix (left-padded among the groups: [pad, prefix]),
        and the cache rows are copied to the prompts. A prompt's row is then [pad, prefix | pad, suffix] with zeros
        in the mask over both pad spans, so the positions HF `generate` counts from the mask are those of the prompt
        alone; `generate` prefills the suffixes on the cache. It takes embeddings of the row's full width and reads
        only the suffix part (the cached part is zeros, never read), so its output holds the new tokens only."""
        groups: dict[tuple, int] = {}
        member = [groups.setdefault((tuple(map(id, im)), tuple(s[:k])), len(groups))
                  for s, k, im in zip(seqs, splits, images)]
        first = [member.index(g) for g in range(len(groups))]
        prefix_ids, prefix_mask = self._left_pad([seqs[i][:splits[i]] for i in first])
        flat = [im for i in first for im in images[i]]
        distinct = {id(im): im for im in flat}
        features = None
        if flat:
            encoded = self.encode_images(self.preprocess(list(distinct.values())))
            slot = {key: n for n, key in enumerate(distinct)}
            features = encoded[torch.tensor([slot[id(im)] for im in flat], device=encoded.device)]
        out = self.language_model(inputs_embeds=self.embed(prefix_ids, features), attention_mask=prefix_mask,
                                  position_ids=positions_from_mask(prefix_mask), use_cache=True, logits_to_keep=1)
        # the cache's name: `cache` in newer transformers 5.x (which warn on `past_key_values`), else `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"
        rows = torch.tensor(member, device=self.device)
        cache = getattr(out, cache_arg)
        cache.reorder_cache(rows)  # [groups, ...] -> [prompts, ...]
        suffix_ids, suffix_mask = self._left_pad([s[k:] for s, k in zip(seqs, splits)])
        embedding = self.language_model.get_input_embeddings()
        embeds = torch.zeros((len(seqs), prefix_ids.shape[1] + suffix_ids.shape[1], embedding.weight.shape[1]),
                             dtype=embedding.weight.dtype, device=self.device)
        embeds[:, prefix_ids.shape[1]:] = embedding(suffix_ids)
        mask = torch.cat([prefix_mask[rows], suffix_mask], dim=1)
        out = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **{cache_arg: cache}, **gen)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ------------------------------------------------------------------ score
    @torch.no_grad()
    def score(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        continuations: Sequence[Sequence[str] | str],
        chat_template: bool = True,
        batch_size: int = 8,
        token_budget: int = 1024,
    ) -> list[list[ScoreResult]]:
        """Log-likelihood of each continuation given its item's image(s) and prompt.

        The image+prompt prefix of an item is run once. Its continuations are then packed side by side
        into rows that follow the prefix's KV cache, with a block attention mask (each continuation sees
        the prefix and its own earlier tokens) and positions restarting at the prefix length, so every
        continuation is scored exactly as if it had been run alone, without copying the cache per
        continuation. `batch_size` bounds the prefixes run together (tasks that score several images per item pass
        items x images prefixes, so this stays bounded); `token_budget` bounds the continuation tokens per forward.
        Returns, per item, one `ScoreResult` per continuation (a str continuation counts as a list of one).
        """
        if not (len(images) == len(prompts) == len(continuations)):
            raise ValueError(f"images ({len(images)}), prompts ({len(prompts)}) and continuations ({len(continuations)}) differ in length")
        conts = [[c] if isinstance(c, str) else list(c) for c in continuations]
        results: list[list[ScoreResult]] = []
        for start in range(0, len(prompts), batch_size):
            stop = start + batch_size
            chunk_images = [as_image_list(x) for x in images[start:stop]]
            seqs = [self._prompt_ids(p, len(im), chat_template) for p, im in zip(prompts[start:stop], chunk_images)]
            results.extend(self._score_chunk(seqs, chunk_images, conts[start:stop], token_budget))
        return results

    def _score_chunk(
        self, prefixes: list[list[int]], images: list[list[Any]], conts: list[list[str]], token_budget: int
    ) -> list[list[ScoreResult]]:
        ids, mask = self._left_pad(prefixes)
        flat_images = [im for group in images for im in group]
        # logits of the last prefix position only (left padding puts every row's last token there): [B, T, vocab]
        # would be gigabytes at LLaVA sizes (576 image tokens, 32K-152K vocabularies)
        out = self.forward(ids, mask, pixels=self.preprocess(flat_images) if flat_images else None, use_cache=True,
                           logits_to_keep=1)
        first_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's 1st token
        prefix_cache = list(out.past_key_values)
        prefix_len = mask.sum(-1)
        results: list[list[ScoreResult]] = []
        for i, texts in enumerate(conts):
            toks = [self._continuation_ids(t) for t in texts]
            for t, tk in zip(texts, toks):
                if not tk:
                    raise UserError(f"continuation {t!r} tokenises to nothing; scores need at least one token")
            scored: dict[int, tuple[float, bool]] = {}
            for group in _pack_rows(toks, token_budget):
                scored.update(self._score_packed(group, toks, [(k[i:i + 1], v[i:i + 1]) for k, v, *_ in prefix_cache],
                                                 mask[i], int(prefix_len[i]), first_logprobs[i]))
            results.append([ScoreResult(scored[j][0], scored[j][0] / len(tk), len(tk), scored[j][1])
                            for j, tk in enumerate(toks)])
        return results

    def _score_packed(self, rows: list[list[int]], toks: list[list[int]], prefix_kv: list[tuple], prefix_mask: torch.Tensor,
                      prefix_len: int, first_logprobs: torch.Tensor) -> dict[int, tuple[float, bool]]:
        """Score the continuations `toks[j]` packed in `rows` (lists of j) against one item's prefix cache:
        j -> (summed log-prob, whether every token is its position's argmax)."""
        dev = prefix_mask.device
        n_rows, width = len(rows), max(sum(len(toks[j]) for j in row) for row in rows)
        row_ids = torch.zeros((n_rows, width), dtype=torch.long, device=dev)
        segment = torch.full((n_rows, width), -1, dtype=torch.long, device=dev)
        offset = torch.zeros((n_rows, width), dtype=torch.long, device=dev)
        spans: list[tuple[int, int, int, int]] = []  # (j, row, start, length)
        for r, row in enumerate(rows):
            pos = 0
            for j in row:
                n = len(toks[j])
                row_ids[r, pos:pos + n] = torch.tensor(toks[j], device=dev)
                segment[r, pos:pos + n] = j
                offset[r, pos:pos + n] = torch.arange(n, device=dev)
                spans.append((j, r, pos, n))
                pos += n
        q = torch.arange(width, device=dev)
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & (q[None, :, None] >= q[None, None, :])
        sees_prefix = prefix_mask.bool()[None, None, :].expand(n_rows, width, -1)
        allowed = torch.cat([sees_prefix, same], dim=-1)[:, None]  # [rows, 1, width, prefix + width]
        dtype = self.language_model.get_input_embeddings().weight.dtype
        attn = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1))
                                             for k, v in prefix_kv])
        logits = self.language_model(input_ids=row_ids, attention_mask=attn, position_ids=prefix_len + offset,
                                     past_key_values=cache, use_cache=True).logits.float()
        # token t of a continuation is predicted by the prefix's last position (t = 0) or by position t-1 of its row
        prev = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, row_ids[:, 1:, None]).squeeze(-1)
        token_lp = torch.where(offset[:, 1:] > 0, prev, first_logprobs[row_ids[:, 1:]])
        token_lp = torch.cat([first_logprobs[row_ids[:, :1]], token_lp], dim=1)
        first_greedy = first_logprobs.argmax()
        greedy = torch.where(offset[:, 1:] > 0, logits[:, :-1].argmax(-1) == row_ids[:, 1:], row_ids[:, 1:] == first_greedy)
        greedy = torch.cat([row_ids[:, :1] == first_greedy, greedy], dim=1)
        return {j: (float(token_lp[r, start:start + n].sum()), bool(greedy[r, start:start + n].all()))
                for j, r, start, n in spans}


def _pack_rows(toks: list[list[int]], token_budget: int) -> list[list[list[int]]]:
    """Greedy first-fit packing of continuation indices into rows of at most `token_budget` tokens (a longer
    continuation gets a row of its own), then into groups of rows run together (about `token_budget` tokens)."""
    rows: list[list[int]] = []
    lengths: list[int] = []
    for j in sorted(range(len(toks)), key=lambda j: -len(toks[j])):
        n = len(toks[j])
        for r, used in enumerate(lengths):
            if used + n <= token_budget:
                rows[r].append(j)
                lengths[r] += n
                break
        else:
            rows.append([j])
            lengths.append(n)
    per_group = max(1, token_budget // max(max(lengths), 1)) if rows else 1
    return [rows[g:g + per_group] for g in range(0, len(rows), per_group)]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `stops` (lm-eval's post-processing of a generation)."""
    return text[:min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def _to_device(pixels: Any, device: torch.device) -> Any:
    if isinstance(pixels, Mapping):
        return {k: v.to(device) for k, v in pixels.items()}
    return pixels.to(device)


def check_model_config(model_cfg: Mapping[str, Any], where: str = "model") -> None:
    """What can be checked of a `model` section without building it: its parts, the connector's and the LLM's keys
    against their builders (the encoder family checks its keys when it is built)."""
    check_keys(model_cfg, ("encoder", "connector", "llm"), where)
    for part in ("encoder", "connector", "llm"):
        if not model_cfg.get(part):
            raise UserError(f"{where}.{part} is empty; set it (e.g. defaults: [models/tiny.yaml]).")
    check_connector(model_cfg["connector"], f"{where}.connector")
    check_llm_config(model_cfg["llm"], f"{where}.llm")


def build_vlm(model_cfg: Mapping[str, Any], where: str = "model") -> VLM:
    """Build a VLM from a recipe's `model` section: `{encoder: {...}, connector: {...}, llm: {...}}` (`where`: its
    path in the recipe, named in error messages)."""
    check_model_config(model_cfg, where)
    encoder = build_encoder(dict(model_cfg["encoder"]), f"{where}.encoder")
    llm = build_llm(dict(model_cfg["llm"]), f"{where}.llm")
    llm_dim = llm.model.get_input_embeddings().weight.shape[1]
    connector = build_connector(
        dict(model_cfg["connector"]),
        vision_dim=encoder.hidden_size,
        llm_dim=llm_dim,
        num_tokens=encoder.num_tokens,
        patch_grid_size=encoder.patch_grid_size,
        where=f"{where}.connector",
    )
    return VLM(encoder, connector, llm)
