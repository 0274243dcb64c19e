"""Whether a grid supports the findings this framework was built to test (DESIGN.md, "The research it serves").

Ghosh, Zhang & Schmidt (arXiv 2602.17871): a better vision encoder lifts fine-grained classification more than
general VQA; training the LLM during caption pretraining (stage 1) helps fine-grained; caption quality matters
little next to those. Each finding needs an axis in a given role; the role is read from what the axis changes
(its recipe keys, see `axis_role`). A verdict is `supports`, `contradicts` or `cannot tell`, always with the
effect, its item SE and the seed noise, and only claims what exceeds both noises (`effects.beyond_noise`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from vlm.report.effects import AxisEffect, Estimate, beyond_noise

ROLES = ("encoder", "llm", "stage1_llm", "captions", "seed")
# "matters little": the whole ±2 SE interval of both effects lies within ±CAPTION_MARGIN (absolute score)
CAPTION_MARGIN = 0.05


def axis_role(changed_keys: Sequence[str], first_stage: str | None) -> str | None:
    """What an axis varies, from the dotted recipe keys its levels set differently; None when it is none of ROLES."""
    keys = set(changed_keys)
    if keys and all(k == "run.seed" for k in keys):
        return "seed"
    if any(k == "model.encoder" or k.startswith("model.encoder.") for k in keys):
        return "encoder"
    if any(k == "model.llm" or k.startswith("model.llm.") for k in keys):
        return "llm"
    if first_stage and any(k.startswith(f"stages.{first_stage}.freeze.llm") for k in keys):
        return "stage1_llm"
    if any((first_stage and k.startswith(f"stages.{first_stage}.data")) or "caption" in k for k in keys):
        return "captions"
    return None


@dataclass
class Finding:
    claim: str
    axis: str | None
    verdict: str  # supports | contradicts | cannot tell
    evidence: str


def _fmt(e: AxisEffect | None) -> str:
    if e is None:
        return "–"
    seed = f", seed noise {e.seed_sd:.3f}" if e.seed_sd is not None else ", no seed axis"
    return f"{e.effect.value:+.3f} ± {e.effect.se:.3f} over {e.effect.n} items paired{seed}"


def _get(effects: Sequence[AxisEffect], axis: str, level: str, metric: str) -> AxisEffect | None:
    return next((e for e in effects if e.axis == axis and e.level == level and e.metric == metric), None)


def _levels(effects: Sequence[AxisEffect], axis: str) -> list[str]:
    return list(dict.fromkeys(e.level for e in effects if e.axis == axis))


def encoder_finding(effects: Sequence[AxisEffect], axis: str) -> Finding:
    """For every level vs the reference: orient so the encoder better at fine-grained is 'better'; the claim holds
    when its fine-grained advantage exceeds its general one (the oriented gap effect beyond noise)."""
    claim = "a better vision encoder moves fine-grained accuracy more than general VQA"
    verdicts, lines = [], []
    for level in _levels(effects, axis):
        fg, gen, gap = (_get(effects, axis, level, m) for m in ("fine_grained", "general", "gap"))
        if not (fg and gen and gap):
            continue
        ref = fg.reference
        lines.append(f"{level} vs {ref}: Δ fine-grained {_fmt(fg)}; Δ general {_fmt(gen)}; Δ gap {_fmt(gap)}")
        if not fg.marked:
            verdicts.append("cannot tell")
            continue
        sign = 1.0 if fg.effect.value > 0 else -1.0
        oriented = Estimate(sign * gap.effect.value, gap.effect.se, gap.effect.n)
        if beyond_noise(oriented, gap.seed_sd):
            verdicts.append("supports" if oriented.value > 0 else "contradicts")
        else:
            verdicts.append("cannot tell")
    return Finding(claim, axis, _combine(verdicts), "; ".join(lines) or "no level of this axis has finished twins")


def stage1_llm_finding(effects: Sequence[AxisEffect], axis: str, trained_levels: set[str]) -> Finding:
    """Δ fine-grained of the level whose LLM trains in stage 1 against the frozen one (sign flipped when the
    reference is the trained level)."""
    claim = "training the LLM during stage 1 helps fine-grained accuracy"
    verdicts, lines = [], []
    for level in _levels(effects, axis):
        fg = _get(effects, axis, level, "fine_grained")
        if fg is None:
            continue
        if (level in trained_levels) == (fg.reference in trained_levels):
            continue  # both trained or both frozen (e.g. two learning rates): not this finding's comparison
        sign = 1.0 if level in trained_levels else -1.0
        lines.append(f"{level} vs {fg.reference}: Δ fine-grained {_fmt(fg)}")
        if fg.marked:
            verdicts.append("supports" if sign * fg.effect.value > 0 else "contradicts")
        else:
            verdicts.append("cannot tell")
    return Finding(claim, axis, _combine(verdicts), "; ".join(lines) or "no frozen-vs-trained pair finished")


def captions_finding(effects: Sequence[AxisEffect], axis: str, margin: float = CAPTION_MARGIN) -> Finding:
    """Supports when both effects are resolved to within ±margin; contradicts when either exceeds the margin
    beyond noise."""
    claim = f"caption quality matters little (|Δ| < {margin:g} on fine-grained and general)"
    verdicts, lines = [], []
    for level in _levels(effects, axis):
        both = [e for e in (_get(effects, axis, level, m) for m in ("fine_grained", "general")) if e]
        if len(both) < 2:
            continue
        lines.append(f"{level} vs {both[0].reference}: Δ fine-grained {_fmt(both[0])}; Δ general {_fmt(both[1])}")
        if any(e.marked and abs(e.effect.value) > margin for e in both):
            verdicts.append("contradicts")
        elif all(abs(e.effect.value) + 2 * max(e.effect.se, e.seed_sd or 0.0) < margin for e in both):
            verdicts.append("supports")
        else:
            verdicts.append("cannot tell")
    return Finding(claim, axis, _combine(verdicts), "; ".join(lines) or "no level of this axis has finished twins")


def _combine(verdicts: list[str]) -> str:
    if not verdicts or "cannot tell" in verdicts and len(set(verdicts)) == 1:
        return "cannot tell"
    if "supports" in verdicts and "contradicts" in verdicts:
        return "mixed"
    return "supports" if "supports" in verdicts else ("contradicts" if "contradicts" in verdicts else "cannot tell")


def findings(effects: Sequence[AxisEffect], roles: Mapping[str, str | None],
             trained_levels: Mapping[str, set[str]]) -> list[Finding]:
    """One finding per claim: judged on the first axis in its role, or `cannot tell` naming the missing axis.
    `trained_levels[axis]`: the stage1_llm axis's levels whose LLM is not frozen in stage 1."""
    def axis_for(role: str) -> str | None:
        return next((a for a, r in roles.items() if r == role), None)

    out = []
    enc = axis_for("encoder")
    out.append(encoder_finding(effects, enc) if enc else Finding(
        "a better vision encoder moves fine-grained accuracy more than general VQA", None, "cannot tell",
        "the grid has no axis that changes model.encoder"))
    s1 = axis_for("stage1_llm")
    out.append(stage1_llm_finding(effects, s1, trained_levels.get(s1, set())) if s1 else Finding(
        "training the LLM during stage 1 helps fine-grained accuracy", None, "cannot tell",
        "the grid has no axis that changes the first stage's freeze.llm"))
    cap = axis_for("captions")
    out.append(captions_finding(effects, cap) if cap else Finding(
        f"caption quality matters little (|Δ| < {CAPTION_MARGIN:g} on fine-grained and general)", None,
        "cannot tell", "the grid has no axis that changes the first stage's caption data"))
    return out


def stage1_trained_levels(level_values: Mapping[str, Any]) -> set[str]:
    """Levels of a stage1_llm axis whose freeze policy for the LLM is not `frozen` (label -> the policy value)."""
    out = set()
    for label, value in level_values.items():
        mode = value.get("mode") if isinstance(value, Mapping) else value
        if mode not in (None, "frozen"):
            out.add(label)
    return out
