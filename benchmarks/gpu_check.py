"""Helper of benchmarks/gpu_check.sh: write the real-shape recipe, then summarise the runs against `vlm plan`.

    python benchmarks/gpu_check.py prepare   --out OUT [--tiny]
    python benchmarks/gpu_check.py summarize --out OUT

The recipe: CLIP ViT-L/14-336 (vision config of openai/clip-vit-large-patch14-336) + LLaVA's 2-layer MLP +
Qwen2.5-0.5B-Instruct (its config), random init from the configs stored in vlm/plan/hf_configs (no hub),
bf16, one stage training connector + LLM with gradient checkpointing on the synthetic `quick` world, then an
open-ended classification eval. `--tiny` swaps in tiny configs of the same architectures and fp32 for a CPU
dry run of the plumbing. The summary compares, per strategy, the measured step rate and peak memory (CUDA
allocator) with `vlm plan` run at the measured tokens per sample: MFU = samples/s x planned FLOPs per sample /
the GPU's dense bf16 peak; memory error = (planned - measured) / measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "vlm" / "plan" / "hf_configs"
STRATEGIES = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
WORLD = "${synth_world:quick,0}"


def _config(name: str) -> dict:
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")}


def recipe(tiny: bool) -> dict:
    if tiny:
        encoder = {"type": "clip", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                              "num_attention_heads": 4, "image_size": 56, "patch_size": 14}}
        llm = {"config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2}, "tokenizer": "builtin:chatml"}
        precision, batch, steps = "fp32", 4, 3
    else:
        vision = {k: v for k, v in _config("openai--clip-vit-large-patch14-336")["vision_config"].items()
                  if k != "model_type"}
        encoder = {"type": "clip", "config": vision, "select_layer": -2, "select_tokens": "patch"}
        llm = {"config": _config("Qwen--Qwen2.5-0.5B-Instruct"), "tokenizer": "builtin:chatml", "dtype": "bfloat16"}
        precision, batch, steps = "bf16", 16, 30
    return {
        "run": {"name": "gpu-check", "seed": 0, "progress": False, "log_every": 1},
        "model": {"encoder": encoder, "connector": {"type": "mlp2x_gelu"}, "llm": llm},
        "datasets": {"captions": {"type": "synth", "preset": "quick", "seed": 0, "file": "captions_dense.json"}},
        "distributed": {"strategy": "fsdp", "num_processes": 1},
        "stages": {"finetune": {
            "data": ["captions"], "freeze": {"vision": "frozen", "connector": "full", "llm": "full"},
            "optim": {"lr": 2.0e-5, "warmup_ratio": 0.0}, "precision": precision, "max_steps": steps,
            "batch_size": batch, "grad_accum": 1, "max_length": 1024, "gradient_checkpointing": True,
            "feature_cache": False}},
        "eval": {"tasks": [{"type": "classification", "name": "synth_cls", "path": f"{WORLD}/classification",
                            "protocols": ["open"], "max_new_tokens": 4, "limit": 16}]},
    }


def prepare(out: Path, tiny: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe(tiny), sort_keys=False))
    print(f"wrote {out / 'recipe.yaml'}")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gpu() -> tuple[str, float | None]:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            return name, next((v for k, v in PEAK_BF16.items() if k in name), None)
    except ImportError:
        pass
    return "cpu", None


def summarize(out: Path) -> int:
    gpu, peak = _gpu()
    rows, report = [], {"gpu": gpu, "peak_bf16_flops": peak, "strategies": {}}
    for strategy in STRATEGIES + ("ddp",):
        run = out / f"run_{strategy}"
        if not run.is_dir():
            continue
        steps = [r for r in _read_jsonl(run / "metrics.jsonl") if "samples_per_s" in r]
        manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
        entry: dict = {"steps_logged": len(steps), "engaged": manifest.get("distributed"),
                       "eval": None if results is None else {k: results.get(k) for k in ("fine_grained", "general")},
                       "artifact_saved": any(run.glob("stages/*/artifact*")) or any(run.rglob("*.safetensors"))}
        if steps:
            timed = steps[3:] or steps  # the first steps include warm-up (kernel selection, allocator growth)
            sps = statistics.median(r["samples_per_s"] for r in timed)
            tokens = statistics.median(r["tokens_per_s"] / r["samples_per_s"] for r in timed)
            measured = max(r["peak_memory_mb"] for r in steps) * 2**20
            plan = _plan(out / "recipe.yaml", strategy, tokens)
            st = plan["points"][0]["stages"][0]
            text = int(round(tokens)) - st["image_tokens"]
            entry.update({
                "samples_per_s": sps, "tokens_per_sample": tokens, "text_tokens": text,
                "planned_flops_per_sample": st["flops_per_sample"],
                "achieved_flops_per_s": sps * st["flops_per_sample"],
                "mfu": None if peak is None else sps * st["flops_per_sample"] / peak,
                "measured_peak_bytes": measured, "planned_bytes": st["memory"],
                "memory_error": (st["memory"]["total"] - measured) / measured,
            })
        report["strategies"][strategy] = entry
        rows.append(_row(strategy, entry))
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU check on {gpu}", "",
             "| strategy | engaged | steps | samples/s | tokens/sample | MFU | measured peak GiB | planned GiB | "
             "error | artifact | eval |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    if peak is None:
        lines += ["", "No CUDA device: the measured peak is the process RSS (libraries included) and MFU has no peak "
                      "to divide by; only the plumbing (train, save, reload, eval under each strategy) is checked."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if rows else 1


def _plan(recipe_path: Path, strategy: str, tokens: float) -> dict:
    """`vlm plan --json` of the recipe under this strategy on 1 GPU at the measured tokens per sample (in process:
    the meta model is built once for all strategies)."""
    from vlm.plan.planner import Settings, plan_target, to_json

    cfg = yaml.safe_load(recipe_path.read_text())
    length = int(cfg["stages"]["finetune"]["max_length"])
    over = [f"distributed.strategy={strategy}"]
    probe, _, _ = plan_target(recipe_path, over, Settings(processes=1))
    image = probe[0].stages[0].image_tokens
    settings = Settings(processes=1, text_tokens=max(1, min(int(round(tokens)) - image, length - image)))
    plans, warnings, title = plan_target(recipe_path, over, settings)
    return to_json(plans, warnings, settings, title)


def _row(strategy: str, e: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    gib = 2**30
    eng = e.get("engaged")
    if isinstance(eng, dict):
        eng = f"{eng.get('strategy')}: {eng.get('engaged')}, world {eng.get('world_size')}"
    return (f"| {strategy} | {eng or '-'} | {e['steps_logged']} | {f(e.get('samples_per_s'), '.2f')} | "
            f"{f(e.get('tokens_per_sample'), '.0f')} | {f(e.get('mfu'), '.1%')} | "
            f"{f(None if 'measured_peak_bytes' not in e else e['measured_peak_bytes'] / gib, '.2f')} | "
            f"{f(None if 'planned_bytes' not in e else e['planned_bytes']['total'] / gib, '.2f')} | "
            f"{f(e.get('memory_error'), '+.1%')} | {'yes' if e['artifact_saved'] else 'no'} | "
            f"{json.dumps(e['eval']) if e['eval'] else '-'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["prepare", "summarize"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.what == "prepare":
        prepare(args.out, args.tiny)
        return 0
    return summarize(args.out)


if __name__ == "__main__":
    sys.exit(main())
