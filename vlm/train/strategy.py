"""How a stage's model is spread over the processes: `ddp` (also one process), `fsdp` or `deepspeed_zero2/3`.

accelerate starts the processes and the process group; the model is then wrapped by the library that owns each
strategy: DistributedDataParallel through `accelerate.prepare`, FSDP2 through torch's own `fully_shard` (one unit
per LLM decoder layer and per vision block, then the root; accelerate ignores its FSDP plugin on CPU, torch's
FSDP runs on CPU with gloo as on GPU with NCCL), ZeRO through `deepspeed.initialize`. A strategy that cannot be
engaged is a `UserError`, never a silent fallback, and `describe()` is what `manifest.json` records.

Every collective method (`full_state`, `optimizer_state`, `load_state`, DeepSpeed's `load_partition`) must be
called by every process; `partition_state` (DeepSpeed: this process's own ZeRO partition) is local.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlm.errors import UserError
from vlm.train.checkpoint import load_trained_state, optimizer_from_flat, optimizer_to_flat, trainable_state


def build_optimizer(groups: list[dict], optim: dict) -> torch.optim.Optimizer:
    """The stage's optimizer over `vlm.recipe.freeze.apply_policy`'s parameter groups (`optim`: a recipe's `Optim`)."""
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])
    return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["betas"][0])


def transformer_blocks(vlm: Any) -> list[nn.Module]:
    """The FSDP units: the LLM's decoder layers (its HF `_no_split_modules`) and every block of the vision
    encoder(s), also those after the selected layer (the classes of `encoder.blocks()`), innermost first."""
    lm = vlm.language_model
    names = set(getattr(lm, "_no_split_modules", None) or [])
    units = [m for m in lm.modules() if type(m).__name__ in names]
    if not units:
        raise UserError(f"fsdp: found no decoder layers in {type(lm).__name__} (its `_no_split_modules` is empty); "
                        "use ddp or deepspeed for this LLM.")
    try:
        kinds = {type(b) for b in vlm.encoder.blocks()}
    except NotImplementedError:
        kinds = set()
    units += [m for m in vlm.encoder.modules() if type(m) in kinds]
    return units[::-1]


class Strategy:
    """Plain / DDP through accelerate. Subclasses: `FSDPStrategy`, `DeepSpeedStrategy`."""

    name = "ddp"
    sharded = False
    partitioned = False  # checkpoints hold each process's partition (`partition_state`), not the full optimizer state

    def __init__(self, acc: Any, dtype: torch.dtype | None) -> None:
        self.acc, self.dtype = acc, dtype

    def prepare(self, vlm: nn.Module, groups: list[dict], st: dict) -> tuple[Any, Any]:
        """Wrap the model and build the optimizer over `groups` (`st`: the recipe's stage)."""
        return self.acc.prepare(vlm, build_optimizer(groups, st["optim"]))

    def describe(self) -> dict:
        world = self.acc.num_processes
        engaged = "DistributedDataParallel (accelerate)" if world > 1 else "single process"
        return {"strategy": self.name, "engaged": engaged, "world_size": world, "backend": _backend(),
                "device": self.acc.device.type}

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager:
        return self.acc.no_sync(model) if not sync and self.acc.num_processes > 1 else contextlib.nullcontext()

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        norm = self.acc.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm) if norm is not None else float("nan")

    def clip_and_step(self, model: Any, optimizer: Any, params: list[nn.Parameter], max_norm: float | None,
                      scaler: Any = None) -> float:
        """Clip the gradients of `params` by their global norm, step, zero the gradients; return the norm."""
        norm = self.clip_grad_norm(params, max_norm)
        if scaler is not None:
            scaler.step(self.inner_optimizer(optimizer))
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrap(self, model: Any) -> nn.Module:
        return self.acc.unwrap_model(model)

    def inner_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    # ---------------------------------------------------------------- state (collective)
    def checkpoint_info(self) -> dict:
        """What a checkpoint records of the strategy that wrote it (`check_checkpoint` compares it on resume)."""
        return {"strategy": self.name, "world_size": self.acc.num_processes}

    def check_checkpoint(self, written: dict, where: str) -> None:
        """Refuse a checkpoint written under another strategy (their optimizer states are keyed differently)."""
        if written["strategy"] != self.name:
            raise UserError(f"{where} was written under distributed.strategy {written['strategy']}, this run uses "
                            f"{self.name}; resume with {written['strategy']}, or delete the stage's checkpoints dir "
                            "to start the stage fresh.")

    def full_state(self, model: Any, buffers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Full tensors of the trained parameters (fp32) and of the named buffers (BatchNorm statistics of trained
        modules), on the main process; `{}` elsewhere."""
        return trainable_state(self.unwrap(model), buffers) if self.acc.is_main_process else {}

    def optimizer_state(self, model: Any, optimizer: Any) -> dict:
        return self.inner_optimizer(optimizer).state_dict() if self.acc.is_main_process else {}

    def load_state(self, model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optim_state: dict,
                   where: str) -> None:
        """Load full weights (and buffers) and a full optimizer state on every process (`where`: for errors)."""
        load_trained_state(self.unwrap(model), weights, where)
        self.inner_optimizer(optimizer).load_state_dict(optim_state)


class FSDPStrategy(Strategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters sharded per unit, mixed dtypes allowed per
    parameter, the stage's compute dtype as the mixed-precision policy with fp32 gradient reduction."""

    name = "fsdp"
    sharded = True

    def __init__(self, acc: Any, dtype: torch.dtype | None) -> None:
        super().__init__(acc, dtype)
        self.units = 0

    def prepare(self, vlm: nn.Module, groups: list[dict], st: dict) -> tuple[Any, Any]:
        if not torch.distributed.is_initialized():
            raise UserError("distributed.strategy: fsdp needs a process group; start the run with `accelerate launch` "
                            "or `torchrun` (one process is fine: --nproc_per_node 1).")
        names = {id(p): n for n, p in vlm.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        mesh = init_device_mesh(self.acc.device.type, (self.acc.num_processes,))
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32 if self.dtype else None)
        units = transformer_blocks(vlm)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(vlm, mesh=mesh, mp_policy=mp)
        self.units, self.mp = len(units) + 1, mp
        params = dict(vlm.named_parameters())
        return vlm, build_optimizer([{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names)],
                                    st["optim"])

    def describe(self) -> dict:
        mp = None if self.dtype is None else {"param_dtype": str(self.mp.param_dtype).removeprefix("torch."),
                                              "reduce_dtype": str(self.mp.reduce_dtype).removeprefix("torch.")}
        return {**super().describe(), "engaged": "torch fully_shard (FSDP2)", "sharded_units": self.units,
                "mixed_precision": mp}

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager:
        return _grad_sync(model, sync)

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        # DTensor gradients: the norm is reduced over every shard of every process (the global norm)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unwrap(self, model: Any) -> nn.Module:
        return model

    def full_state(self, model: Any, buffers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: every process, same order
                if self.acc.is_main_process:
                    out[n] = full.detach().cpu().clone()
        named = dict(model.named_buffers())  # FSDP2 does not shard buffers
        if self.acc.is_main_process:
            out.update({n: named[n].detach().cpu().clone() for n in buffers})
        return out

    def optimizer_state(self, model: Any, optimizer: Any) -> dict:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(model, optimizer, options=opts)
        return sd if self.acc.is_main_process else {}

    def load_state(self, model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optim_state: dict,
                   where: str) -> None:
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        unknown = [n for n in weights if n not in known]
        if unknown:
            raise UserError(f"{where} does not fit this model (unknown parameters or buffers {unknown[:3]}...); "
                            "it was made by a different model config.")
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=opts)  # each process keeps its shard of the full tensors
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=opts)


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed.initialize`): fp32 master weights and optimizer state partitioned over
    the processes (ZeRO-3: the 16-bit parameters too), the engine clips by the global norm. Artifacts hold the full
    fp32 master weights, gathered with DeepSpeed's `safe_get_full_fp32_param`. On CPU it runs with DeepSpeed's CPU
    accelerator (detected when no GPU is visible; `DS_ACCELERATOR=cpu` forces it) over gloo.

    Checkpoints: each process writes its own ZeRO partition (`partition_state`): the fp32 master flat partitions,
    the torch optimizer's state over them, the loss scaler and the engine's counters; a resume needs the same
    process count and ZeRO stage, copies them back and refreshes the 16-bit weights from the fp32 masters as
    DeepSpeed's own checkpoint loading does (`load_partition`), so it continues bitwise."""

    sharded = True
    partitioned = True

    def __init__(self, acc: Any, dtype: torch.dtype | None, stage: int) -> None:
        super().__init__(acc, dtype)
        self.stage, self.name = stage, f"deepspeed_zero{stage}"

    def prepare(self, vlm: nn.Module, groups: list[dict], st: dict) -> tuple[Any, Any]:
        import deepspeed

        optimizer = build_optimizer(groups, st["optim"])
        config = {"train_micro_batch_size_per_gpu": st["batch_size"], "gradient_accumulation_steps": 1,
                  "gradient_clipping": st["optim"]["max_grad_norm"] or 0.0, "steps_per_print": 2**31,
                  "zero_optimization": {"stage": self.stage}, "zero_allow_untested_optimizer": True,
                  "bf16": {"enabled": self.dtype == torch.bfloat16}, "fp16": {"enabled": self.dtype == torch.float16}}
        try:
            engine, _, _, _ = deepspeed.initialize(model=vlm, optimizer=optimizer, config=config)
        except Exception as e:  # no usable accelerator / communication backend: never fall back silently
            raise UserError(f"distributed.strategy: {self.name} could not be engaged ({type(e).__name__}: {e}); "
                            "use ddp or fsdp.") from e
        return engine, optimizer  # the LR schedule drives the client optimizer's groups, which the engine steps

    def describe(self) -> dict:
        import deepspeed

        return {**super().describe(), "engaged": f"deepspeed ZeRO-{self.stage} ({deepspeed.__version__})",
                "accelerator": deepspeed.get_accelerator().device_name()}

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # one micro-batch a step (validated: grad_accum 1)

    def backward(self, model: Any, loss: torch.Tensor) -> None:
        model.backward(loss)

    def clip_and_step(self, model: Any, optimizer: Any, params: list[nn.Parameter], max_norm: float | None,
                      scaler: Any = None) -> float:
        model.step()  # clips by the global norm of all partitions, steps, zeroes the gradients
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrap(self, model: Any) -> nn.Module:
        return model.module

    def inner_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        return optimizer

    def checkpoint_info(self) -> dict:
        return {**super().checkpoint_info(), "zero_stage": self.stage}

    def check_checkpoint(self, written: dict, where: str) -> None:
        world = self.acc.num_processes
        zero = written["strategy"].startswith("deepspeed_zero")
        if zero and (written["world_size"] != world or written["zero_stage"] != self.stage):
            raise UserError(
                f"{where} was written by {written['world_size']} process(es) under ZeRO-{written['zero_stage']}, "
                f"this run has {world} under ZeRO-{self.stage}: ZeRO partitions the fp32 weights and the optimizer "
                f"state per process, so it resumes only as written. Relaunch with {written['world_size']} processes "
                "(`--nproc_per_node`), or delete the stage's checkpoints dir to start the stage fresh.")
        super().check_checkpoint(written, where)

    def _fp32_partitions(self, model: Any) -> list[torch.Tensor]:
        zero = model.optimizer
        return list(zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups)

    @contextlib.contextmanager
    def _optimizer_over_partitions(self, model: Any) -> Iterator[None]:
        """ZeRO-3 hands the torch optimizer its fp32 partitions only while it steps; put them into its parameter
        groups meanwhile (as DeepSpeed's own state_dict / load_state_dict do). ZeRO-2 keeps them there."""
        zero = model.optimizer
        if self.stage == 3:
            zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            if self.stage == 3:
                zero._clear_fp32_optimizer_param_groups()

    def partition_state(self, model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict]:
        """This process's ZeRO partition: fp32 master partitions `fp32.<group>`, the torch optimizer's state over
        them `optimizer.<index>.<key>` (+ JSON), the loss scaler and the engine's step counters."""
        zero = model.optimizer
        flats = self._fp32_partitions(model)
        tensors = {f"fp32.{i}": t.detach().cpu().clone() for i, t in enumerate(flats)}
        with self._optimizer_over_partitions(model):
            ot, om = optimizer_to_flat(optimizer.state_dict())
        tensors.update({f"optimizer.{k}": v.clone() for k, v in ot.items()})
        meta = {**self.checkpoint_info(), "rank": self.acc.process_index,
                "fp32_partitions": [list(t.shape) for t in flats], "optimizer": om,
                "loss_scaler": _json_scalars(zero.loss_scaler), "overflow": bool(zero.overflow),
                "engine": {k: getattr(model, k) for k in _ENGINE_COUNTERS}}
        return tensors, meta

    def load_partition(self, model: Any, optimizer: Any, tensors: dict[str, torch.Tensor], meta: dict,
                       where: str) -> None:
        """Restore this process's partition (`partition_state`), then the 16-bit weights from the fp32 masters."""
        self.check_checkpoint(meta, where)
        zero = model.optimizer
        flats = self._fp32_partitions(model)
        shapes = [list(t.shape) for t in flats]
        if meta["fp32_partitions"] != shapes:
            raise UserError(f"{where}: process {self.acc.process_index}'s fp32 partitions have shapes "
                            f"{meta['fp32_partitions']}, this model's {shapes}; it was written for another model or "
                            "freeze policy. Delete the stage's checkpoints dir to start the stage fresh.")
        if self.stage == 3:
            zero.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's load_checkpoint does
        with torch.no_grad():
            for i, t in enumerate(flats):
                t.copy_(tensors[f"fp32.{i}"])
        prefix = "optimizer."
        with self._optimizer_over_partitions(model):
            optimizer.load_state_dict(optimizer_from_flat(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["optimizer"]))
        for k, v in meta["loss_scaler"].items():
            setattr(zero.loss_scaler, k, v)
        zero.overflow = meta["overflow"]
        for k in _ENGINE_COUNTERS:
            setattr(model, k, meta["engine"][k])
        if self.stage == 3:  # fp32 -> 16-bit partitions (as its step does), then re-gather the persistent parameters
            for sub_group in range(len(flats)):
                zero._reassign_or_swap_out_partitioned_parameters(sub_group)
            zero.checkpoint_event_epilogue()
        else:  # fp32 -> this process's 16-bit partition, all-gathered into every process's 16-bit weights
            zero.update_lp_params()

    def full_state(self, model: Any, buffers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in model.module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # a collective under ZeRO-3
                if self.acc.is_main_process:
                    out[n] = full.detach().cpu().clone()
        named = dict(model.module.named_buffers())
        if self.acc.is_main_process:
            out.update({n: named[n].detach().cpu().clone() for n in buffers})
        return out


_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _json_scalars(obj: Any) -> dict:
    """The plain-number attributes of `obj` (a DeepSpeed loss scaler: its scale, iteration and overflow counters)."""
    return {k: v for k, v in vars(obj).items() if v is None or isinstance(v, (bool, int, float))}


@contextlib.contextmanager
def _grad_sync(model: Any, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _backend() -> str | None:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else None


def make_strategy(name: str, acc: Any, dtype: torch.dtype | None) -> Strategy:
    """The strategy of a recipe's `distributed.strategy` for the stage's compute dtype."""
    if name.startswith("deepspeed_zero"):
        return DeepSpeedStrategy(acc, dtype, stage=int(name.removeprefix("deepspeed_zero")))
    return {"ddp": Strategy, "fsdp": FSDPStrategy}[name](acc, dtype)
