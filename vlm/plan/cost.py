"""What one training sample costs: FLOPs and saved activations, traced on a meta-device model.

One sample (one image, `max_length` tokens after image expansion) is run forward on the meta device through
the real modules: `encoder → connector → LLM decoder → LM head on the labelled positions → cross-entropy`,
as `VLM._label_loss_sum` computes it. Nothing is computed; forward hooks record, for every matmul module,
its shape and whether autograd will need its input gradient and its weight gradient, and
`scaled_dot_product_attention` is replaced by a shape-only stand-in that records each attention call and
saves what a fused (flash / memory-efficient) kernel saves. The formula (docs/plan.md):

    forward   F = Σ_matmul 2·M  +  Σ_attention 4·B·H·Lq·Lk·d          (M: multiply-adds of the call)
    backward  Σ_matmul 2·M·([input needs grad] + [weight trained])
              + Σ_attention 10·B·H·Lq·Lk·d·[q/k/v need grad]
    recompute (gradient checkpointing): the forward of every checkpointed layer that backward passes through,
              but its last matmul (torch's checkpoint stops recomputing once the saved tensors are back)

so a frozen module pays its forward, its activation gradient only when something upstream of it is trained,
and never a weight gradient. Elementwise ops, norms and softmax are not counted (as
`torch.utils.flop_counter.FlopCounterMode` does not count them), the attention score matrix is counted
in full, causal or not, and a fused attention backward recomputes the scores (5 matmuls, 2.5x its forward),
all as FlopCounterMode counts them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MatmulCall:
    name: str
    macs: int
    input_grad: bool
    weight_grad: bool
    block: str | None
    node: Any = None  # the output's autograd node (dropped after the pass)


@dataclass
class AttentionCall:
    flops: int  # forward: QK^T and PV
    backward: int  # fused backward: recomputed QK^T, dP = dO V^T, dV, dQ, dK
    needs_grad: bool
    block: str | None
    node: Any = None


@dataclass
class Trace:
    """What one sample's forward pass does (batch 1)."""

    matmuls: list[MatmulCall] = field(default_factory=list)
    attention: list[AttentionCall] = field(default_factory=list)
    saved: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # storage -> (bytes, block)
    block_input_bytes: dict[str, int] = field(default_factory=dict)
    block_needs_grad: dict[str, bool] = field(default_factory=dict)
    image_tokens: int = 0
    labelled_tokens: int = 0
    logits_bytes: int = 0  # the fp32 logits over the labelled positions (their gradient is as large)

    # ------------------------------------------------------------------ FLOPs
    def forward_flops(self, blocks: set[str] | None = None) -> int:
        """Forward FLOPs (of the given blocks only, when `blocks` is given)."""
        sel = (lambda b: True) if blocks is None else (lambda b: b in blocks)
        return (sum(2 * m.macs for m in self.matmuls if sel(m.block))
                + sum(a.flops for a in self.attention if sel(a.block)))

    def backward_flops(self) -> int:
        return (sum(2 * m.macs * (int(m.input_grad) + int(m.weight_grad)) for m in self.matmuls)
                + sum(a.backward for a in self.attention if a.needs_grad))

    def recompute_flops(self, checkpointed: set[str]) -> int:
        """Gradient checkpointing re-runs the forward of each checkpointed block that backward reaches, up to the
        last tensor its backward needs (torch's non-reentrant checkpoint stops early): the block's last matmul,
        whose output nothing in the block saves, is not re-run."""
        blocks = {b for b in checkpointed if self.block_needs_grad.get(b)}
        last: dict[str, MatmulCall] = {}
        for m in self.matmuls:
            if m.block in blocks:
                last[m.block] = m
        return self.forward_flops(blocks) - sum(2 * m.macs for m in last.values())

    # ------------------------------------------------------------------ activations
    def saved_bytes(self, checkpointed: set[str] = frozenset()) -> int:
        """Bytes autograd keeps from forward to backward; a checkpointed block keeps only its input, and one
        block's activations at a time are rebuilt during backward."""
        total = sum(n for n, _ in self.saved.values())
        ck = {b for b in checkpointed if self.block_needs_grad.get(b)}
        if not ck:
            return total
        per_block: dict[str, int] = {}
        for n, b in self.saved.values():
            if b in ck:
                per_block[b] = per_block.get(b, 0) + n
        kept = sum(self.block_input_bytes.get(b, 0) for b in ck)
        return total - sum(per_block.values()) + kept + max(per_block.values(), default=0)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _AttentionStandIn(torch.autograd.Function):
    """Output shape of SDPA; saves q, k, v, out and the fp32 log-sum-exp, as a fused kernel does."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover - never run (meta planning only)
        raise RuntimeError("the planning stand-in of attention has no backward")


@contextlib.contextmanager
def _one_unpadded_sequence() -> Iterator[None]:
    """HF's mask code reads mask values (padding? packed sequences?), which meta tensors do not have; the traced
    input is one unpadded sequence, so answer those questions for it."""
    from transformers import masking_utils

    saved = masking_utils.find_packed_sequence_indices, masking_utils.fast_all
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    masking_utils.fast_all = lambda tensor: True
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices, masking_utils.fast_all = saved


@contextlib.contextmanager
def _patched_sdpa(trace: Trace, current: list[str | None]) -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention

    def stand_in(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        lq, d = query.shape[-2], query.shape[-1]
        heads = query.numel() // (lq * d)  # batch x query heads
        lk, dv = key.shape[-2], value.shape[-1]
        flops = 2 * heads * lq * lk * (d + dv)
        backward = 2 * heads * lq * lk * (3 * d + 2 * dv)
        needs = query.requires_grad or key.requires_grad or value.requires_grad
        out = _AttentionStandIn.apply(query, key, value)
        trace.attention.append(AttentionCall(flops=flops, backward=backward, needs_grad=needs, block=current[0],
                                             node=out.grad_fn))
        return out

    torch.nn.functional.scaled_dot_product_attention = stand_in
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return x.numel() // module.in_features * module.in_features * module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = 1
        for s in module.kernel_size:
            k *= s
        return out.numel() * (module.in_channels // module.groups) * k
    return 0


def checkpoint_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The layers HF gradient checkpointing wraps (decoder / encoder layers), by module name."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}


def trace_sample(vlm: Any, max_length: int, compute_dtype: torch.dtype, text_tokens: int | None = None) -> Trace:
    """Trace one training sample through a meta-device VLM in `compute_dtype`: one image and `text_tokens` text
    tokens (default: as many as fill `max_length`, the most a sample can cost), all of them labelled.

    The model's parameters keep their dtype and `requires_grad` (set by the stage's freeze policy); the
    pass runs on dtype-converted views and restores nothing else."""
    trace = Trace()
    current: list[str | None] = [None]
    block_nodes: dict[str, Any] = {}
    packed: dict[int, tuple[int, str | None]] = {}
    params: set[int] = set()
    originals = {p: p.dtype for p in vlm.parameters()}
    hooks = []

    def on_matmul(name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            trace.matmuls.append(MatmulCall(name, _macs(module, x, out), bool(x.requires_grad),
                                            bool(module.weight.requires_grad), current[0], out.grad_fn))
        return hook

    def enter(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current[0] = name
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                trace.block_input_bytes[name] = x.numel() * x.element_size()
        return hook

    def leave(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            block_nodes[name] = getattr(first, "grad_fn", None)
            current[0] = None
        return hook

    for name, m in vlm.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(on_matmul(name)))
    for name, m in checkpoint_blocks(vlm).items():
        hooks.append(m.register_forward_pre_hook(enter(name), with_kwargs=True))
        hooks.append(m.register_forward_hook(leave(name), with_kwargs=True))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in packed:
            packed[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    try:
        for p in vlm.parameters():
            if p.is_floating_point():
                p.data = p.data.to(compute_dtype)
        params.update(_storage_key(t) for t in (*vlm.parameters(), *vlm.buffers()))
        with _patched_sdpa(trace, current), _one_unpadded_sequence(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _forward_one(vlm, max_length, trace, text_tokens)
        _keep_what_backward_reaches(trace, loss, packed, block_nodes)
    finally:
        for h in hooks:
            h.remove()
        for p, dt in originals.items():
            p.data = p.data.to(dt)
    return trace


def blank_pixels(vlm: Any) -> Any:
    """The encoder's pixel input for one image of its own resolution (built on CPU, moved to meta)."""
    from PIL import Image

    pixels = vlm.encoder.preprocess([Image.new("RGB", (64, 64))])
    if isinstance(pixels, dict):
        return {k: v.to("meta") for k, v in pixels.items()}
    return pixels.to("meta")


def _forward_one(vlm: Any, max_length: int, trace: Trace, text_tokens: int | None) -> None:
    lm = vlm.language_model
    image = vlm.connector(vlm.encoder(blank_pixels(vlm)).to(next(vlm.connector.parameters()).dtype))
    n_img = image.shape[1]
    n_text = max(max_length - n_img, 1) if text_tokens is None else max(min(text_tokens, max_length - n_img), 1)
    trace.image_tokens, trace.labelled_tokens = n_img, n_text
    emb = lm.get_input_embeddings()
    text = emb(torch.zeros(1, n_text, dtype=torch.long, device="meta"))
    embeds = torch.cat([image.to(text.dtype), text], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device="meta")
    hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[:, -n_text - 1:-1]).float()
    trace.logits_bytes = logits.numel() * logits.element_size()
    targets = torch.zeros(n_text, dtype=torch.long, device="meta")
    return torch.nn.functional.cross_entropy(logits.reshape(n_text, -1), targets, reduction="sum")


def _saved_by(node: Any) -> Iterator[torch.Tensor]:
    """Tensors an autograd node holds for its backward."""
    names = ["saved_tensors"] if hasattr(node, "saved_tensors") else [a for a in dir(node) if a.startswith("_saved_")]
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:
            continue
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor):
                yield t


def _keep_what_backward_reaches(trace: Trace, loss: torch.Tensor, packed: dict[int, tuple[int, str | None]],
                                block_nodes: dict[str, Any]) -> None:
    """Only the part of the graph the loss depends on runs backward and keeps saved tensors alive: e.g. encoder
    layers after `select_layer` run forward but get no gradient, and their saved tensors are freed."""
    reached: set[int] = set()
    live: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in reached:
            continue
        reached.add(id(node))
        live.update(_storage_key(t) for t in _saved_by(node))
        stack.extend(n for n, _ in node.next_functions)
    for m in trace.matmuls:
        if m.node is None or id(m.node) not in reached:
            m.input_grad = m.weight_grad = False
        m.node = None
    for a in trace.attention:
        a.needs_grad = a.needs_grad and a.node is not None and id(a.node) in reached
        a.node = None
    trace.block_needs_grad = {b: n is not None and id(n) in reached for b, n in block_nodes.items()}
    trace.saved = {k: v for k, v in packed.items() if k in live}
