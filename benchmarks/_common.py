"""Shared pieces of the benchmarks: model configs, fair alternating timing, memory, FLOP counting.

Timing rule (these machines are shared and noisy): the two sides run in one process, alternating
A, B, A, B, ... after warm-up, and every table reports the median (and min/max) of the repetitions.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

# glibc returns large freed blocks to the OS only when the mmap threshold is fixed; with it RSS follows
# live memory, so the peak RSS of a step (VmHWM after resetting it) measures that step's memory on CPU.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def reexec_with_malloc_env() -> None:
    """Restart this script once with a fixed glibc mmap threshold (must be set before the process starts)."""
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC_ENV})


def set_threads(n: int) -> None:
    """Torch intra-op threads. On a CPU shared with other jobs, 1 thread avoids OpenMP threads spinning at barriers
    while their partner thread is descheduled (measured here: 2 threads were 4-6x *slower* than 1 under load)."""
    if n > 0:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- configs
def clip_vision(hidden: int, layers: int, heads: int, image: int, patch: int, mlp_ratio: int = 4) -> dict:
    """A random-init HF CLIP vision tower (HF LLaVA needs CLIP or SigLIP, so both sides use CLIP)."""
    return {"type": "clip", "config": {"hidden_size": hidden, "intermediate_size": hidden * mlp_ratio,
                                       "num_hidden_layers": layers, "num_attention_heads": heads,
                                       "image_size": image, "patch_size": patch}}


def llm(model_type: str, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int | None,
        tie: bool, tokenizer: str = "builtin:chatml", max_pos: int = 4096) -> dict:
    config = {"model_type": model_type, "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "tie_word_embeddings": tie, "max_position_embeddings": max_pos}
    if vocab is not None:
        config["vocab_size"] = vocab
    return {"config": config, "tokenizer": tokenizer}


MODELS: dict[str, dict] = {
    # DINOv2-S-sized CLIP tower (224 px, patch 14 -> 256 patch tokens) + SmolLM2-135M-sized Llama.
    "cpu-small": {"encoder": clip_vision(384, 12, 6, 224, 14), "connector": {"type": "mlp2x_gelu"},
                  "llm": llm("llama", 576, 1536, 30, 9, 3, 49152, tie=True)},
    # CLIP ViT-L/14-336 (576 patch tokens) + Qwen2-1.5B-sized LM: the GPU MFU config.
    "gpu-l336-1.5b": {"encoder": clip_vision(1024, 24, 16, 336, 14), "connector": {"type": "mlp2x_gelu"},
                      "llm": llm("qwen2", 1536, 8960, 28, 12, 2, 151936, tie=True)},
}

STAGE2_FREEZE = {"vision": "frozen", "connector": "full", "llm": "full"}
STAGE1_FREEZE = {"vision": "frozen", "connector": "full", "llm": "frozen"}


def freeze_policy(modes: dict[str, str]) -> dict:
    """A freeze policy with the recipe schema's defaults (`vlm.recipe.ModulePolicy`)."""
    from dataclasses import asdict

    from vlm.recipe.schema import ModulePolicy

    return {m: asdict(ModulePolicy(mode=mode)) for m, mode in modes.items()}


def optim_cfg(lr: float = 2e-5) -> dict:
    from dataclasses import asdict

    from vlm.recipe.schema import Optim

    return {**asdict(Optim()), "lr": lr}


def build(model_cfg: dict, seed: int = 0) -> Any:
    from vlm.model.vlm import build_vlm

    torch.manual_seed(seed)
    return build_vlm(model_cfg)


# --------------------------------------------------------------------------- synthetic batches
def random_images(n: int, size: int, seed: int) -> tuple[list[Any], list[str]]:
    """Random RGB PIL images and their content keys (sha256 of the PNG bytes, like the data pipeline's)."""
    import hashlib
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images, keys = [], []
    for _ in range(n):
        im = Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        images.append(im)
        keys.append(hashlib.sha256(buf.getvalue()).hexdigest())
    return images, keys


def make_batch(vlm: Any, batch: int, prompt_tokens: int, answer_tokens: int, seed: int = 0, image_px: int = 256) -> dict:
    """A training micro-batch as `vlm.data.collate` makes it (what `vlm.train.train_step` consumes): equal-length
    samples `[text-start, <image> x N', prompt, answer]`, labels on the answer only, one random PIL image each."""
    from vlm.data.datasets import collate

    g = torch.Generator().manual_seed(seed)
    n_img = vlm.num_image_tokens
    text_vocab = min(len(vlm.tokenizer) - 1, vlm.language_model.get_input_embeddings().num_embeddings)
    images, keys = random_images(batch, image_px, seed)
    items = []
    for i in range(batch):
        prompt = torch.randint(0, text_vocab, (1 + prompt_tokens,), generator=g)
        answer = torch.randint(0, text_vocab, (answer_tokens,), generator=g)
        prompt[prompt == vlm.image_token_id] = 0
        answer[answer == vlm.image_token_id] = 0
        ids = torch.cat([prompt[:1], torch.full((n_img,), vlm.image_token_id), prompt[1:], answer])
        labels = torch.cat([torch.full((1 + n_img + prompt_tokens,), -100), answer])
        items.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "images": [images[i]],
                      "image_keys": [keys[i]]})
    pad_id = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
    return collate(items, pad_id=pad_id)


# --------------------------------------------------------------------------- timing + memory
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of a code block in MiB: CUDA allocator peak, or on Linux CPU the RSS high-water mark."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mib = float("nan")
        self.delta_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif os.path.exists("/proc/self/clear_refs"):
            peak = _status_kb("VmHWM") * 1024
        else:
            return
        self.peak_mib = peak / 2**20
        self.delta_mib = (peak - self.base) / 2**20


def alternate(sides: dict[str, Callable[[], Any]], reps: int, warmup: int, device: str = "cpu",
              memory: bool = True) -> dict[str, dict]:
    """Run each side `warmup` times, then `reps` rounds of A, B, ... (order rotated each round).

    Returns per side: wall `times` (s) with `median`, `min`, `max`; `cpu_median` (process CPU seconds, all
    threads: less sensitive than wall time to other jobs on a shared machine); `peak_mib` / `delta_mib`.
    """
    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
            sync(device)
    out: dict[str, dict] = {n: {"times": [], "cpu": [], "peak_mib": 0.0, "delta_mib": 0.0} for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            mem = PeakMemory(device) if memory else None
            if mem:
                mem.__enter__()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            sides[n]()
            sync(device)
            out[n]["times"].append(time.perf_counter() - t0)
            out[n]["cpu"].append(time.process_time() - c0)
            if mem:
                mem.__exit__()
                out[n]["peak_mib"] = max(out[n]["peak_mib"], mem.peak_mib)
                out[n]["delta_mib"] = max(out[n]["delta_mib"], mem.delta_mib)
    for n in names:
        t = out[n]["times"]
        out[n].update(median=statistics.median(t), min=min(t), max=max(t), cpu_median=statistics.median(out[n]["cpu"]))
    return out


# --------------------------------------------------------------------------- FLOPs
def linear_params(module: nn.Module) -> int:
    """Weights that take part in matmuls (nn.Linear and HF Conv1D-free models), i.e. 2 FLOPs per token each."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def patch_embed_params(encoder: nn.Module) -> int:
    return sum(m.weight.numel() for m in encoder.modules() if isinstance(m, nn.Conv2d))


def train_step_flops(vlm: Any, batch: int, seq_len: int, modes: dict[str, str]) -> dict[str, float]:
    """Analytic matmul FLOPs of one training step (forward + backward) on `batch` samples of `seq_len` tokens.

    Per token and matmul weight: 6 FLOPs in a *trained* module (forward 2, activation-grad 2, weight-grad 2),
    4 in a *frozen* module that gradients pass through (the LLM in stage 1), 2 in a frozen module no gradient
    reaches (the vision tower under a frozen policy). Attention scores and values (QK^T, AV), counted in full
    (not halved for causality): 4*T^2*d_attn per layer forward, times the same 3x / 2x / 1x factor.
    Embedding lookups, norms, activations and softmax are not counted (the usual convention).
    """
    enc, hf_vis = vlm.encoder, vlm.encoder.model
    t_v = enc.num_patches + (1 if enc.has_cls else 0) + enc.num_register_tokens
    vis_fwd = (2 * linear_params(hf_vis) * t_v + 2 * patch_embed_params(hf_vis) * enc.num_patches
               + 4 * hf_vis.config.num_hidden_layers * t_v ** 2 * hf_vis.config.hidden_size)
    lm = vlm.language_model
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    llm_fwd = (2 * linear_params(lm) * seq_len  # includes lm_head: its matmul runs whether or not it is tied
               + 4 * cfg.num_hidden_layers * seq_len ** 2 * cfg.num_attention_heads * head_dim)
    con_fwd = 2 * linear_params(vlm.connector) * vlm.num_image_tokens
    trained = {m: modes[m] != "frozen" for m in ("vision", "connector", "llm")}
    grad_through_llm = trained["vision"] or trained["connector"]
    factor = {
        "vision": 3 if trained["vision"] else 1,
        "connector": 3 if trained["connector"] else (2 if trained["vision"] else 1),
        "llm": 3 if trained["llm"] else (2 if grad_through_llm else 1),
    }
    flops = {"vision": batch * factor["vision"] * vis_fwd, "connector": batch * factor["connector"] * con_fwd,
             "llm": batch * factor["llm"] * llm_fwd}
    flops["total"] = sum(flops.values())
    return flops


def matmul_flops_per_s(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> dict:
    """Measured dense matmul FLOP/s (median and best of `reps` timed n x n x n products; `cpu_median` per CPU-second)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 1 if device == "cpu" else 20
    for _ in range(2):
        torch.matmul(a, b)
    sync(device)
    rates, cpu_rates = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.matmul(a, b)
        sync(device)
        rates.append(2 * n ** 3 * inner / (time.perf_counter() - t0))
        cpu_rates.append(2 * n ** 3 * inner / max(time.process_time() - c0, 1e-9))
    return {"median": statistics.median(rates), "best": max(rates), "cpu_median": statistics.median(cpu_rates), "n": n}


# --------------------------------------------------------------------------- reporting
def machine() -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for pkg in ("torch", "transformers", "accelerate"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)
