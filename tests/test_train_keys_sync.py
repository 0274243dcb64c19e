"""Stage artifact keys cover the process layout (issue 17.7); the artifact lock never leaves ranks in a barrier and
RNG state is saved for the process's own GPU only (issue 17.10)."""
from __future__ import annotations

import pytest
import torch

from _train_data import free_port, hold_lock_then_release, wait_for_lock_rank, write_recipe
from vlm.errors import UserError
from vlm.io import read_json
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import load_recipe
from vlm.train.steps import train


def test_keys_change_with_the_process_layout(tmp_path):
    p = write_recipe(tmp_path)
    one = stage_keys(load_recipe(p))
    assert stage_keys(load_recipe(p, ["distributed.num_processes=1"])) == one  # null = 1 process
    assert stage_keys(load_recipe(p, ["distributed.num_processes=8"]))[0] != one[0]  # global batch 32 -> 256
    # the same global batch from another layout is still another artifact (and another strategy too)
    assert stage_keys(load_recipe(p, ["stages.align.batch_size=4", "distributed.num_processes=8"]))[0] != \
        stage_keys(load_recipe(p, ["stages.align.batch_size=32"]))[0]
    assert stage_keys(load_recipe(p, ["distributed.strategy=fsdp"]))[0] != one[0]


def test_a_run_records_its_process_count_and_keys_by_it(tmp_path):
    recipe = write_recipe(tmp_path)
    over = ["stages.finetune.enabled=false", "stages.align.max_steps=1", "stages.align.batch_size=4"]
    train(load_recipe(recipe, over), tmp_path / "run")
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved.distributed.num_processes == 1
    assert read_json(tmp_path / "run" / "manifest.json")["stages"]["align"]["key"] == stage_keys(saved)[0]
    with pytest.raises(UserError, match="num_processes"):  # launched with fewer processes than the recipe says
        train(load_recipe(recipe, [*over, "distributed.num_processes=2"]), tmp_path / "other")


def test_ranks_wait_for_the_artifact_lock_without_a_barrier_timeout(tmp_path):
    """Another run holds the stage's lock for 8 s after both ranks reach it, longer than the process group's 3 s
    timeout: every rank waits and then enters together (a rank parked in a barrier meanwhile would time out)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=hold_lock_then_release,
                         args=(str(tmp_path / "k.lock"), 8.0, ready, str(tmp_path / "w.started")))
    holder.start()
    ready.wait(30)
    port = free_port()
    procs = [ctx.Process(target=wait_for_lock_rank, args=(r, port, str(tmp_path / "k.lock"), str(tmp_path / "w")))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    holder.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(float((tmp_path / f"w.{r}").read_text()) > 6 for r in (0, 1))


def test_rng_state_touches_only_this_process_gpu(monkeypatch):
    """`get_rng_state_all` would create a CUDA context on every visible GPU from every rank."""
    from vlm.train import checkpoint

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("touched every GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("touched every GPU"))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": seen.append(("get", device)) or
                        torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": seen.append(("set", device)))
    tensors, meta = checkpoint.rng_state()
    checkpoint.set_rng_state(tensors, meta)
    assert seen == [("get", 2), ("set", 2)]
