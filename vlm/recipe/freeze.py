"""Freeze policies as data: per stage and module (`vision`, `connector`, `llm`).

Modes: `frozen` | `full` | `lora` (peft adapters injected in place) | `partial` (train the last k blocks that
feed the output). `apply_policy` sets `requires_grad`, the train/eval modes (`set_train_modes`: frozen parts in
eval mode) and returns optimizer param groups with each module's lr and weight decay (no decay on biases and
norms). `trained_buffer_names` lists the buffers (BatchNorm statistics) saved with the trained parameters.
`merge_lora` folds adapters back into the base weights so the next stage (or an export) sees a plain model.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import nn

from vlm.errors import UserError

MODULES = ("vision", "connector", "llm")


def module_of(vlm: Any, name: str) -> nn.Module:
    return {"vision": lambda: vlm.encoder, "connector": lambda: vlm.connector, "llm": lambda: vlm.llm.model}[name]()


def block_groups(module: nn.Module) -> list[list[nn.Module]] | None:
    """The stacked blocks that feed a module's output, per member backbone: a vision encoder's `block_groups()`
    (its `blocks()`, cut by the encoder at its `select_layer`; one group per sub-encoder of a fused encoder, since
    `partial` k counts per member), else the module's largest nn.ModuleList; `None` when it has none (also for an
    encoder that does not implement `blocks()`: its largest ModuleList would ignore `select_layer`)."""
    if callable(getattr(module, "block_groups", None)):
        try:
            return [list(g) for g in module.block_groups()]
        except NotImplementedError:
            return None
    best, best_n = None, 0
    for _, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    return [list(best)] if best is not None else None


def check_policy_static(freeze: Mapping[str, Any], where: str) -> None:
    """Checks that need no model: something trainable, LoRA only where it makes sense, sane numbers."""
    modes = {m: freeze[m]["mode"] for m in MODULES}
    if all(v == "frozen" for v in modes.values()):
        raise UserError(f"{where}: every module is frozen, so nothing would train; set at least one of "
                        "vision / connector / llm to full, lora or partial.")
    if modes["connector"] == "lora":
        raise UserError(f"{where}.connector: LoRA on the connector is not supported (it is small and trained from "
                        "scratch); use `full`.")
    for m in MODULES:
        p = freeze[m]
        if p["mode"] == "lora" and (p["r"] < 1 or p["alpha"] <= 0 or not 0 <= p["dropout"] < 1):
            raise UserError(f"{where}.{m}: lora needs r >= 1, alpha > 0 and 0 <= dropout < 1; got r={p['r']}, "
                            f"alpha={p['alpha']}, dropout={p['dropout']}.")
        if p["mode"] == "partial" and p["k"] < 1:
            raise UserError(f"{where}.{m}: partial needs k >= 1 (the number of last blocks to train), got {p['k']}.")
        if p["lr"] is not None and p["lr"] < 0:
            raise UserError(f"{where}.{m}.lr must be >= 0, got {p['lr']}.")


def _linear_targets(module: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names - {"lm_head"})


def _inject_lora(module: nn.Module, p: Mapping[str, Any], where: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(p["target_modules"]) if p["target_modules"] else _linear_targets(module)
    present = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise UserError(f"{where}: lora target_modules {missing or targets} not found in the module; "
                        f"its linear layers are: {', '.join(_linear_targets(module)) or 'none'}.")
    cfg = LoraConfig(r=int(p["r"]), lora_alpha=float(p["alpha"]), lora_dropout=float(p["dropout"]),
                     target_modules=targets, bias="none")
    inject_adapter_in_model(cfg, module)


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def merge_lora(module: nn.Module, merge: bool = True) -> None:
    """Fold every LoRA adapter into its base layer (or drop it, `merge=False`) and put the plain layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            if merge:
                m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, m.get_base_layer())
    if hasattr(module, "peft_config"):  # left by peft's injection; a later stage may inject again
        del module.peft_config


def partial_blocks(mod: nn.Module, k: int, where: str) -> list[nn.Module]:
    """The blocks `partial` with k trains: the last k that feed the module's output, per member of a fused encoder."""
    groups = block_groups(mod)
    if not groups or not all(groups):
        raise UserError(f"{where}: partial freezing needs a module with stacked blocks that feed its output, and this "
                        f"{type(mod).__name__} has none (a vision encoder selecting its embeddings, select_layer 0, "
                        "has none either); use full or frozen.")
    for i, g in enumerate(groups):
        if k > len(g):
            whose = f"the fused encoder's encoders[{i}]" if len(groups) > 1 else "the module"
            raise UserError(f"{where}: partial k={k} but {whose} has only {len(g)} blocks that feed its output "
                            f"(blocks after the selected layer get no gradient); use k <= {min(map(len, groups))}.")
    return [b for g in groups for b in g[-k:]]


def check_policy_model(vlm: Any, freeze: Mapping[str, Any], where: str) -> None:
    """Checks that need the built model (without changing it): blocks for `partial`, LoRA targets present."""
    for name in MODULES:
        p, mod = freeze[name], module_of(vlm, name)
        if p["mode"] == "partial":
            partial_blocks(mod, p["k"], f"{where}.{name}")
        if p["mode"] == "lora" and p["target_modules"]:
            present = {n.rsplit(".", 1)[-1] for n, _ in mod.named_modules()}
            missing = [t for t in p["target_modules"] if t not in present]
            if missing:
                raise UserError(f"{where}.{name}: lora target_modules {missing} not found in the module; its linear "
                                f"layers are: {', '.join(_linear_targets(mod)) or 'none'}.")
        if p["mode"] == "lora" and not p["target_modules"] and not _linear_targets(mod):
            raise UserError(f"{where}.{name}: lora needs linear layers and this module has none.")


def apply_policy(vlm: Any, freeze: Mapping[str, Any], optim: Mapping[str, Any], where: str = "freeze") -> list[dict]:
    """Set requires_grad per the policy; return param groups (`name`, `params`, `lr`, `weight_decay`)."""
    groups: list[dict] = []
    for name in MODULES:
        p = freeze[name]
        mod = module_of(vlm, name)
        for prm in mod.parameters():
            prm.requires_grad_(False)
        mode = p["mode"]
        if mode == "full":
            trainable: Iterator = mod.named_parameters()
        elif mode == "partial":
            blocks = partial_blocks(mod, p["k"], f"{where}.{name}")
            trainable = (kv for b in blocks for kv in b.named_parameters())
        elif mode == "lora":
            if not has_lora(mod):
                _inject_lora(mod, p, f"{where}.{name}")
            trainable = ((n, t) for n, t in mod.named_parameters() if "lora_" in n)
        else:
            trainable = iter(())
        decay, no_decay = [], []
        for n, prm in trainable:
            prm.requires_grad_(True)
            (no_decay if prm.ndim < 2 else decay).append(prm)
        lr = optim["lr"] if p["lr"] is None else p["lr"]
        wd = optim["weight_decay"] if p["weight_decay"] is None else p["weight_decay"]
        for suffix, params, w in (("", decay, wd), (".no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": name + suffix, "params": params, "lr": lr, "weight_decay": w})
    if not groups:
        raise UserError(f"{where}: the policy leaves no trainable parameter; check the modes.")
    set_train_modes(vlm, freeze)
    return groups


def _has_running_stats(m: nn.Module) -> bool:
    return bool(getattr(m, "track_running_stats", False)) and getattr(m, "running_mean", None) is not None


def _mode_dependent(m: nn.Module) -> bool:
    """Leaves whose forward differs between train and eval mode: dropout, and norms with running statistics."""
    return isinstance(m, nn.modules.dropout._DropoutNd) or _has_running_stats(m)


def _hold_fixed(mod: nn.Module) -> None:
    """A frozen part computes as in eval mode (no dropout, BatchNorm statistics kept) while the module itself stays
    in train mode: HF runs gradient checkpointing only in train mode, and a frozen LLM that the connector's gradient
    flows through (stage 1) needs it as much as a trained one — as LLaVA trains it. (HF attention modules read
    attention-probability dropout off their own flag; the shipped LLM configs set it to 0.)"""
    mod.train()
    for m in mod.modules():
        if _mode_dependent(m):
            m.eval()


def set_train_modes(vlm: Any, freeze: Mapping[str, Any]) -> None:
    """Train/eval mode per the policy; call it after every `model.train()` (which puts everything in train mode).

    `full`: train mode. `frozen`: eval mode; a frozen LLM (the trained connector's gradient flows through it) is
    held fixed instead (`_hold_fixed`: computes as in eval mode, gradient checkpointing still engages).
    `partial`: held fixed except the trained blocks. `lora`: train mode
    (the adapters' dropout), but normalisation layers with running statistics (BatchNorm) in eval mode, since the
    base weights they belong to are frozen.
    """
    for name in MODULES:
        p, mod = freeze[name], module_of(vlm, name)
        if p["mode"] == "frozen" and name != "llm":
            mod.eval()  # upstream of everything trained: no gradient flows through it, nothing to checkpoint
        elif p["mode"] in ("frozen", "partial"):
            _hold_fixed(mod)
        else:
            mod.train()
        if p["mode"] == "partial":
            for block in partial_blocks(mod, p["k"], name):
                block.train()
        elif p["mode"] == "lora":
            for m in mod.modules():
                if _has_running_stats(m):
                    m.eval()


def trained_buffer_names(vlm: Any, freeze: Mapping[str, Any]) -> list[str]:
    """Names (as in `vlm.state_dict()`) of the persistent buffers training changes, which stage artifacts and
    checkpoints must carry with the trained parameters: those inside a `full` module or the trained blocks of a
    `partial` one (BatchNorm running_mean / running_var / num_batches_tracked). Frozen and LoRA modules keep theirs:
    `set_train_modes` holds their running statistics in eval mode."""
    scopes: list[nn.Module] = []
    for name in MODULES:
        p, mod = freeze[name], module_of(vlm, name)
        if p["mode"] == "full":
            scopes.append(mod)
        elif p["mode"] == "partial":
            scopes.extend(partial_blocks(mod, p["k"], name))
    inside = {id(b) for scope in scopes for b in scope.buffers()}
    persistent = vlm.state_dict(keep_vars=True)
    return [n for n, b in vlm.named_buffers() if id(b) in inside and n in persistent]


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
