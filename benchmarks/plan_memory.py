"""`vlm plan`'s memory estimate vs the measured peak of real training steps (CPU RSS, or the CUDA allocator).

Each case runs in a fresh process: build the model (`build_vlm`), `apply_policy`, AdamW over its param groups,
then `--steps` optimizer steps of the trainer's step on one process (ddp, P = 1: label-only loss, backward, step,
gradients set to None), with the trainer's gradient checkpointing when the case asks for it.
Measured: peak memory above what the process held before the
model was built (CPU: the RSS high-water mark, glibc mmap threshold fixed so freed tensors leave RSS; CUDA:
`max_memory_allocated`). Planned: `vlm.plan` on the same config on the meta device (weights + gradients + AdamW
state + activations; ddp, 1 process). The error is (planned - measured) / measured.

    .venv/bin/python benchmarks/plan_memory.py [--device cuda] [--batch 4 --length 512 --steps 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CPU_MODEL = {"encoder": C.clip_vision(256, 4, 4, 112, 14), "connector": {"type": "mlp2x_gelu"},
             "llm": C.llm("qwen2", 512, 1536, 8, 8, 4, 8192, tie=False)}
CASES = {  # name -> (freeze modes, gradient checkpointing)
    "stage2 (connector+llm)": (C.STAGE2_FREEZE, False),
    "stage2 + grad ckpt": (C.STAGE2_FREEZE, True),
    "stage1 (connector only)": (C.STAGE1_FREEZE, False),
}


def _train(vlm, modes: dict, ckpt: bool, batch: int, length: int, steps: int, device: str) -> None:
    """The trainer's step on one process: policy, AdamW over its param groups, the trainer's checkpointing,
    label-only loss (`label_loss_sum`), backward, step, zero_grad (gradients set to None)."""
    import torch

    from vlm.recipe.freeze import apply_policy

    freeze = C.freeze_policy(modes)
    groups = apply_policy(vlm, freeze, C.optim_cfg(), "benchmark")
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    if ckpt:
        for m in _checkpointable(vlm, freeze):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_img = vlm.num_image_tokens
    for s in range(steps):
        b = C.make_batch(vlm, batch, 0, length - 1 - n_img, seed=s)
        out = vlm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                  labels=b["labels"].to(device), pixels=vlm.preprocess(b["images"]), label_loss_sum=True)
        (out.loss / max(out.num_tokens, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _checkpointable(vlm, freeze: dict) -> list:
    """As the trainer enables it: the LLM, and a trained HF vision backbone."""
    out = [vlm.language_model]
    backbone = getattr(vlm.encoder, "model", None)
    if freeze["vision"]["mode"] != "frozen" and getattr(backbone, "supports_gradient_checkpointing", False):
        out.append(backbone)
    return out


def measure(case: str, batch: int, length: int, steps: int, device: str, precision: str) -> dict:
    if precision != "fp32":
        raise SystemExit("the measured loop runs fp32 (the trainer's autocast is not reproduced here)")
    modes, ckpt = CASES[case]
    # Warm-up on a tiny model of the same architectures: lazy imports and the matmul libraries take memory once,
    # which is not the training's.
    tiny = C.build({"encoder": C.clip_vision(32, 2, 2, 28, 14), "connector": {"type": "mlp2x_gelu"},
                    "llm": C.llm("qwen2", 32, 64, 2, 2, 1, 256, tie=False)}).to(device)
    _train(tiny, modes, ckpt, 2, 32, 1, device)
    del tiny
    gc.collect()
    with C.PeakMemory(device) as peak:
        vlm = C.build(CPU_MODEL).to(device)
        _train(vlm, modes, ckpt, batch, length, steps, device)
    return {"case": case, "measured_bytes": peak.delta_mib * 2**20}


def plan(case: str, batch: int, length: int, precision: str) -> dict:
    import torch

    from vlm.plan.cost import DTYPE_BYTES, PRECISION_DTYPE, trace_sample
    from vlm.plan.memory import memory_per_gpu
    from vlm.plan.meta import build_meta_vlm
    from vlm.plan.planner import _checkpointed
    from vlm.recipe.freeze import apply_policy

    modes, ckpt = CASES[case]
    freeze = C.freeze_policy(modes)
    vlm = build_meta_vlm(CPU_MODEL)
    with torch.device("meta"):
        apply_policy(vlm, freeze, C.optim_cfg())
    dtype = PRECISION_DTYPE[precision]
    trace = trace_sample(vlm, length, dtype)
    blocks = _checkpointed(vlm, {"gradient_checkpointing": ckpt, "freeze": freeze})
    mem = memory_per_gpu(vlm, batch * trace.saved_bytes(blocks), strategy="ddp", processes=1,
                         compute_bytes=DTYPE_BYTES[dtype], optimizer="adamw",
                         logits_grad_bytes=batch * trace.logits_bytes)
    return mem.as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.reexec_with_malloc_env()
    C.set_threads(args.threads)
    if args.case:  # child: one measurement, JSON on the last line
        print(json.dumps(measure(args.case, args.batch, args.length, args.steps, args.device, args.precision)))
        return
    rows, errors = [], {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--device", args.device, "--precision", args.precision,
               "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"case {case!r} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout.strip().splitlines()[-1]
        measured = json.loads(out)["measured_bytes"]
        planned = plan(case, args.batch, args.length, args.precision)
        err = (planned["total"] - measured) / measured
        errors[case] = err
        mib = 2**20
        rows.append([case, f"{measured / mib:.0f}", f"{planned['total'] / mib:.0f}",
                     f"{(planned['weights'] + planned['optimizer']) / mib:.0f}", f"{planned['gradients'] / mib:.0f}",
                     f"{planned['activations'] / mib:.0f}", f"{planned['logits_grad'] / mib:.0f}",
                     f"{100 * err:+.1f}%"])
    print(f"device {args.device}, {args.precision}, batch {args.batch}, {args.length} tokens, {args.steps} steps; "
          f"machine: {json.dumps(C.machine())}")
    print(C.table(["case", "measured MiB", "planned MiB", "weights+opt", "grads", "activations", "logits grad",
                   "error"], rows))
    print("RATIO " + " ".join(f"plan_mem_err[{k.split(' ')[0]}{'+ckpt' if 'ckpt' in k else ''}]={v:+.3f}"
                              for k, v in errors.items()))


if __name__ == "__main__":
    main()
