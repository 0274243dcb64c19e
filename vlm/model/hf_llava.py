"""Interop with HF transformers' `LlavaForConditionalGeneration`, the reference implementation.

`load_hf_llava(path)` turns a LLaVA checkpoint (CLIP or SigLIP vision tower; Llama, Mistral or
Qwen2 text model; `mlp2x_gelu` projector) into a `VLM` of this framework; `export_hf_llava(vlm, out)`
writes a checkpoint that `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor` load, whose
chat template takes HF's list-of-parts messages. Weights are moved by name, so both directions are exact
(tested to 1e-4 on log-probs and logits in fp32, and token for token through AutoProcessor +
apply_chat_template + generate).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor,
    PreTrainedModel,
)

from connectors import build_connector
from encoders import build_encoder
from vlm.errors import UserError
from vlm.model.llm import LanguageModel
from vlm.model.vlm import VLM

VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TEXT_TYPES = {"llama", "mistral", "qwen2"}


def _hf_backbone(module: nn.Module) -> PreTrainedModel:
    """The HF vision model an encoder wraps (the part that maps to LLaVA's `vision_tower`)."""
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise UserError(f"encoder {type(module).__name__} wraps no HF vision model; only HF CLIP/SigLIP encoders export to hf-llava")


def _image_transform_cfg(path: Path | None, family: str, image_size: int) -> dict[str, Any]:
    """Resize mode, mean and std from the checkpoint's preprocessor_config.json (HF semantics)."""
    defaults = {
        "clip": {"resize": "center_crop", "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
        "siglip": {"resize": "resize", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }[family]
    cfg = dict(defaults)
    pre = path / "preprocessor_config.json" if path is not None else None
    if pre is not None and pre.exists():
        p = json.loads(pre.read_text())
        if p.get("image_mean"):
            cfg["mean"] = list(p["image_mean"])
        if p.get("image_std"):
            cfg["std"] = list(p["image_std"])
        if "do_center_crop" in p:
            cfg["resize"] = "center_crop" if p["do_center_crop"] else "resize"
        if p.get("do_pad"):
            cfg["resize"] = "letterbox"
    cfg["image_size"] = image_size
    return cfg


def load_hf_llava(spec: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load `spec` (a local dir or a hub id) as a `VLM`."""
    local = Path(spec)
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise UserError(f"cannot load hf-llava checkpoint {spec!r}: {e}. Give a local directory written by "
                        "save_pretrained or a reachable hub id.") from e
    cfg = hf.config
    vtype = cfg.vision_config.model_type
    if vtype not in VISION_TYPES:
        raise UserError(f"hf-llava {spec!r}: vision tower {vtype!r} is not supported (CLIP or SigLIP)")
    if cfg.text_config.model_type not in TEXT_TYPES:
        raise UserError(f"hf-llava {spec!r}: text model {cfg.text_config.model_type!r} is not supported ({', '.join(sorted(TEXT_TYPES))})")
    if not isinstance(cfg.vision_feature_layer, int):
        raise UserError(f"hf-llava {spec!r}: multi-layer vision features {cfg.vision_feature_layer} are not supported")
    family = VISION_TYPES[vtype]
    has_cls = family == "clip"
    strategy = cfg.vision_feature_select_strategy
    select_tokens = "patch" if (strategy == "default" or not has_cls) else "cls_patch"
    if strategy == "default" and not has_cls:
        raise UserError(f"hf-llava {spec!r}: SigLIP with vision_feature_select_strategy='default' drops a real patch "
                        "(SigLIP has no CLS token); set it to 'full' in config.json")

    encoder = build_encoder({
        "type": family,
        "config": cfg.vision_config.to_dict(),
        "select_layer": cfg.vision_feature_layer,
        "select_tokens": select_tokens,
        **_image_transform_cfg(local if local.is_dir() else None, family, cfg.vision_config.image_size),
    })
    _hf_backbone(encoder).load_state_dict(hf.model.vision_tower.state_dict())

    if cfg.projector_hidden_act != "gelu" or not cfg.multimodal_projector_bias:
        raise UserError(f"hf-llava {spec!r}: projector activation {cfg.projector_hidden_act!r} is not supported (gelu with bias)")
    connector = build_connector(
        {"type": "mlp", "depth": 2},
        vision_dim=encoder.hidden_size, llm_dim=cfg.text_config.hidden_size,
        num_tokens=encoder.num_tokens, patch_grid_size=encoder.patch_grid_size,
    )
    proj = hf.model.multi_modal_projector
    connector.load_state_dict(_projector_to_mlp(proj.state_dict()))

    text = AutoModelForCausalLM.from_config(cfg.text_config, dtype=dtype)
    text.model.load_state_dict(hf.model.language_model.state_dict())
    text.lm_head.load_state_dict(hf.lm_head.state_dict())
    text.generation_config = hf.generation_config
    image_token = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
    llm = LanguageModel(model=text, tokenizer=tokenizer, image_token=image_token, image_token_id=cfg.image_token_id,
                        cfg={"path": f"hf-llava:{spec}"})
    vlm = VLM(encoder, connector, llm).to(dtype)
    del hf
    return vlm.eval()


def _projector_to_mlp(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("linear_1.", "layers.0.").replace("linear_2.", "layers.2."): v for k, v in sd.items()}


def _mlp_to_projector(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("layers.0.", "linear_1.").replace("layers.2.", "linear_2."): v for k, v in sd.items()}


def to_hf_llava(vlm: Any) -> Any:
    """An in-memory `LlavaForConditionalGeneration` holding `vlm`'s weights (raises UserError when not expressible)."""
    enc = vlm.encoder
    backbone = _hf_backbone(enc)
    if backbone.config.model_type not in VISION_TYPES:
        raise UserError(f"export to hf-llava needs a CLIP or SigLIP encoder, this run uses {backbone.config.model_type!r}")
    layers = getattr(vlm.connector, "layers", None)
    if not (isinstance(layers, nn.Sequential) and len(layers) == 3 and isinstance(layers[1], nn.GELU)
            and getattr(layers[1], "approximate", "none") == "none"):
        raise UserError("export to hf-llava needs the mlp2x_gelu connector (Linear-GELU-Linear); this run uses "
                        f"{type(vlm.connector).__name__}")
    if enc.has_cls and enc.select_tokens == "patch":
        strategy = "default"
    elif enc.select_tokens in ("patch", "cls_patch") and (enc.has_cls or enc.select_tokens == "patch") and enc.num_register_tokens == 0:
        strategy = "full"
    else:
        raise UserError(f"select_tokens={enc.select_tokens!r} has no hf-llava equivalent (use 'patch' or 'cls_patch')")
    text = vlm.language_model
    config = LlavaConfig(
        vision_config=backbone.config.to_dict(),
        text_config=text.config.to_dict(),
        image_token_index=vlm.image_token_id,
        vision_feature_layer=enc.select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=layers[0].bias is not None,
        image_seq_length=vlm.num_image_tokens,
        tie_word_embeddings=bool(getattr(text.config, "tie_word_embeddings", False)),
    )
    hf = LlavaForConditionalGeneration(config).to(next(text.parameters()).dtype)
    hf.model.vision_tower.load_state_dict(backbone.state_dict())
    hf.model.multi_modal_projector.load_state_dict(_mlp_to_projector(vlm.connector.state_dict()))
    hf.model.language_model.load_state_dict(text.model.state_dict())
    hf.lm_head.load_state_dict(text.lm_head.state_dict())
    return hf.eval()


# Prepended to the exported chat template: HF's list-of-parts message content ({"type": "image"},
# {"type": "text", "text": ...}) becomes the plain string the model was trained on, an image part
# as the image token and a newline (LLaVA's "<image>\n" + question), so HF's processors and servers can
# use the template while string content renders exactly as before (IMAGE_TOKEN: the image token, quoted).
LIST_CONTENT_PREAMBLE = """{#- vlm-ablate export: list-of-parts content -> the plain string this model was trained on -#}
{%- set parts_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set parts_ns.messages = parts_ns.messages + [message] -%}
{%- else -%}
{%- set text_ns = namespace(value='') -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}
{%- set text_ns.value = text_ns.value + IMAGE_TOKEN + '\\n' -%}
{%- elif part['type'] == 'text' -%}
{%- set text_ns.value = text_ns.value + part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set parts_ns.messages = parts_ns.messages + [{'role': message['role'], 'content': text_ns.value}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = parts_ns.messages -%}
"""


def hf_chat_template(template: str, image_token: str) -> str:
    """`template` (written for string message content) made to accept HF's list-of-parts content too."""
    return LIST_CONTENT_PREAMBLE.replace("IMAGE_TOKEN", json.dumps(image_token)) + template


def _image_processor(vlm: Any) -> Any:
    """A LlavaImageProcessor that reproduces the encoder's transform (resize, center crop or LLaVA's pad)."""
    t = vlm.encoder.transform
    h, w = t.size
    if t.resize == "letterbox" and h != w:
        raise UserError(f"export to hf-llava: letterbox to a non-square {h}x{w} has no HF image processor equivalent "
                        "(LlavaImageProcessor pads to a square)")
    center_crop = t.resize == "center_crop"
    return LlavaImageProcessor(
        size={"shortest_edge": min(h, w)} if center_crop else {"height": h, "width": w},
        crop_size={"height": h, "width": w}, do_center_crop=center_crop, do_pad=t.resize == "letterbox",
        image_mean=list(t.mean), image_std=list(t.std))


def export_hf_llava(vlm: Any, out_dir: str | Path) -> Path:
    """Write `vlm` as an HF LLaVA checkpoint into `out_dir`: model, tokenizer and a `LlavaProcessor`
    (processor_config.json with patch size and feature strategy, preprocessor_config.json, and the chat
    template taking both string and list-of-parts content), so `AutoProcessor` + `apply_chat_template`
    + `generate` run it as they run llava-hf checkpoints."""
    if not isinstance(vlm, VLM):
        raise UserError(f"export to hf-llava needs a model of this framework (a run dir, recipe or zoo pair), not "
                        f"{type(vlm).__name__}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export target {out} exists and is not empty; choose a new --out directory")
    hf = to_hf_llava(vlm)
    if not vlm.tokenizer.chat_template:
        raise UserError("export to hf-llava: the model's tokenizer has no chat template; set `llm.chat_template`")
    tokenizer = copy.deepcopy(vlm.tokenizer)
    tokenizer.chat_template = hf_chat_template(vlm.tokenizer.chat_template, vlm.image_token)
    enc = vlm.encoder
    processor = LlavaProcessor(
        image_processor=_image_processor(vlm), tokenizer=tokenizer, image_token=vlm.image_token,
        patch_size=int(_hf_backbone(enc).config.patch_size),
        vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if enc.has_cls else 0, chat_template=tokenizer.chat_template)
    h, w = enc.transform.size
    n = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
    n -= 1 if processor.vision_feature_select_strategy == "default" else 0  # LlavaProcessor's own count
    if n != vlm.num_image_tokens:
        raise UserError(f"export to hf-llava: LlavaProcessor would insert {n} image tokens per image, the model "
                        f"uses {vlm.num_image_tokens}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    # also the separate file that older transformers, vLLM and the llava-hf hub repos use
    processor.image_processor.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
