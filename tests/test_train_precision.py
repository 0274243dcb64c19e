"""Mixed precision (issue 17.1): trained parameters keep fp32 master weights and fp32 optimizer state while the
compute runs in bf16; frozen modules stay stored in the configured (bf16) dtype."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from _train_data import write_recipe
from vlm.io import read_json
from vlm.recipe.schema import load_recipe
from vlm.train.run_dir import build_model, load_run
from vlm.train.steps import train

STAGE2 = ["stages.align.enabled=false", "stages.finetune.max_steps=3", "stages.finetune.batch_size=4",
          "stages.finetune.precision=bf16", "stages.finetune.optim.lr=2.0e-5", "stages.finetune.optim.warmup_ratio=0.0",
          "stages.finetune.optim.scheduler=constant", "stages.finetune.gradient_checkpointing=false",
          "stages.finetune.max_length=128"]


def _changed(cfg, out: Path) -> tuple[float, list[str], dict[str, torch.Tensor]]:
    """Fraction of LLM weight elements that differ from the initial weights; names of unchanged norm weights."""
    init = {n: p.detach().float() for n, p in build_model(cfg).named_parameters() if n.startswith("language_model.")}
    art = Path(read_json(out / "stages" / "finetune" / "artifact.json")["path"])
    w = load_file(str(art / "weights.safetensors"))
    llm = {n: t for n, t in w.items() if n.startswith("language_model.")}
    assert llm.keys() == init.keys()
    diff = sum(int((llm[n].float() != init[n]).sum()) for n in llm)
    total = sum(t.numel() for t in llm.values())
    frozen_norms = [n for n in llm if "norm" in n and torch.equal(llm[n].float(), init[n])]
    return diff / total, frozen_norms, llm


def test_bf16_llm_trains_on_fp32_master_weights(tmp_path):
    recipe = write_recipe(tmp_path)
    frac = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_recipe(recipe, STAGE2 + [f"model.llm.dtype={dtype}"])
        out = tmp_path / dtype
        train(cfg, out)
        frac[dtype], frozen_norms, llm = _changed(cfg, out)
        assert not frozen_norms, f"{dtype}: norm weights never updated: {frozen_norms[:3]}"
        assert all(t.dtype == torch.float32 for t in llm.values())  # the artifact holds the master weights
        ckpt = out / "stages" / "finetune" / "checkpoints"
        opt = load_file(str(ckpt / read_json(ckpt / "latest.json")["dir"] / "optimizer.safetensors"))
        assert opt and all(t.dtype == torch.float32 for k, t in opt.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert frac["float32"] > 0.5
    assert frac["bfloat16"] > 0.9 * frac["float32"], frac  # bf16 storage without a master copy: ~0.3x

    vlm = load_run(tmp_path / "bfloat16")  # frozen / reloaded modules keep their configured storage dtype
    assert {p.dtype for p in vlm.language_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vlm.encoder.parameters()} == {torch.float32}

