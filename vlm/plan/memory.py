"""Memory per GPU of one training stage under ddp / fsdp / DeepSpeed ZeRO-2 / ZeRO-3 (docs/plan.md).

Trained parameters are held in fp32 (the master copy) with compute in the stage's precision; frozen
parameters stay in the dtype they were built in. Per trained parameter: 4 B weight + 4 B gradient + the
optimizer's fp32 state (AdamW 8 B: exp_avg and exp_avg_sq; SGD with momentum 4 B).

| strategy | trained weights            | frozen weights | gradients | optimizer | gathered for compute          |
|----------|----------------------------|----------------|-----------|-----------|-------------------------------|
| ddp      | 4·Nt                       | F              | 4·Nt      | s·Nt      | -                             |
| zero2    | c·Nt + 4·Nt/P              | F              | 4·Nt/P    | s·Nt/P    | -                             |
| zero3    | (c + 4)·Nt/P               | F/P            | 4·Nt/P    | s·Nt/P    | c·(root + 2·largest block)    |
| fsdp     | 4·Nt/P                     | F/P            | 4·Nt/P    | s·Nt/P    | c·(root + 2·largest block)    |

(Nt trained parameters, F frozen bytes, P processes, c bytes of the compute dtype, s optimizer bytes.)
Peak = weights + optimizer + gathered + max(gradients, activations + gradient of the fp32 logits): backward
starts with every saved activation and the logits' gradient alive, then frees activations while parameter
gradients fill up (they are set to None after each step). ZeRO-2
keeps a compute-dtype copy of the model on every rank and shards the fp32 master, gradients and optimizer;
ZeRO-3 and FSDP (FULL_SHARD, one unit per transformer block) shard everything and gather one block at a time
(plus the next, prefetched) and the root unit (embeddings, head, connector) for compute. Activations are
those autograd saves for one micro-batch (`Trace.saved_bytes`), times the per-GPU batch size. Not included:
the CUDA context and kernels' workspaces, allocator fragmentation, communication buckets, and the transient
gradient of the activations during backward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from vlm.plan.cost import checkpoint_blocks

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
OPTIM_STATE_BYTES = {"adamw": 8, "sgd": 4}


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float
    logits_grad: float = 0.0

    @property
    def total(self) -> float:
        """The peak during backward: it starts holding every activation plus the fp32 logits' gradient, and frees
        activations layer by layer while the parameter gradients fill up (they are freed after each step)."""
        return (self.weights + self.optimizer + self.gathered
                + max(self.gradients, self.activations + self.logits_grad))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _unit_params(vlm: nn.Module) -> tuple[int, int]:
    """(parameters outside any transformer block, parameters of the largest block): the FSDP/ZeRO-3 units."""
    blocks = checkpoint_blocks(vlm)
    in_blocks = {id(p) for b in blocks.values() for p in b.parameters()}
    root = sum(p.numel() for p in vlm.parameters() if id(p) not in in_blocks)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks.values()), default=0)
    return root, largest


def memory_per_gpu(vlm: nn.Module, activation_bytes: float, *, strategy: str, processes: int, compute_bytes: int,
                   optimizer: str, logits_grad_bytes: float = 0.0) -> Memory:
    """Bytes per GPU; `activation_bytes` and `logits_grad_bytes` are already per micro-batch."""
    p = max(int(processes), 1)
    trained = sum(t.numel() for t in vlm.parameters() if t.requires_grad)
    frozen = sum(t.numel() * t.element_size() for t in vlm.parameters() if not t.requires_grad)
    s = OPTIM_STATE_BYTES[optimizer]
    c = compute_bytes
    gathered = 0.0
    if strategy == "ddp":
        weights, grads, opt = 4 * trained + frozen, 4 * trained, s * trained
    elif strategy == "deepspeed_zero2":
        weights, grads, opt = c * trained + 4 * trained / p + frozen, 4 * trained / p, s * trained / p
    elif strategy in ("deepspeed_zero3", "fsdp"):
        own = (c + 4) * trained if strategy == "deepspeed_zero3" else 4 * trained
        weights, grads, opt = (own + frozen) / p, 4 * trained / p, s * trained / p
        # FSDP casts each unit to the compute dtype when it runs, even unsharded (P = 1).
        if p > 1 or (strategy == "fsdp" and c < 4):
            root, largest = _unit_params(vlm)
            gathered = c * (root + 2 * largest)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")
    return Memory(weights=float(weights), gradients=float(grads), optimizer=float(opt),
                  activations=float(activation_bytes), gathered=float(gathered), logits_grad=float(logits_grad_bytes))
