"""Zero-shot classification with a contrastive image-text model (type `zero_shot`): the encoder's own ceiling.

CLIP and SigLIP were trained with a text tower; classifying an image by its similarity to "a photo of a
{name}." shows what the vision encoder knows before any LLM reads it. Beside the linear probe
(`linear_probe`), this is the other "VLM vs its own encoder" number of Ghosh et al. and Zhang et al.

Protocol (Radford et al. 2021, CLIP; the ensemble of openai/CLIP's Prompt_Engineering_for_ImageNet
notebook): every class name is put into each template of a prompt ensemble, the text embeddings are
L2-normalised, averaged over the templates and normalised again; an image is assigned the class whose
embedding has the largest cosine with its normalised image embedding. Probabilities: softmax over the
classes of `logit_scale.exp() * cosine` for CLIP; SigLIP scores each class independently with a sigmoid of
`logit_scale.exp() * cosine + logit_bias`; the argmax, i.e. the ranking and the accuracy, is the same
either way. SigLIP's texts are padded to `max_length` (64), as it was trained.

Config: the data keys of `classification` (`hf`/`path`, `split`, `classnames`, ...); `model`: a CLIP or
SigLIP checkpoint (dir or hub id) holding both towers, by default the evaluated VLM's own encoder
`path`; `templates`: a list of strings with `{}` or the name of a set in `TEMPLATE_SETS` (default
`imagenet`, CLIP's 80); `batch_size`. Metrics `acc`, `top5`, `gold_prob`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eval.base import TASKS, Task
from eval.classification import DATA_OPTIONS, ClassificationData
from eval.data import open_image
from eval.metrics import ItemScore, ratio_of_sums
from vlm.errors import UserError

# openai/CLIP: notebooks/Prompt_Engineering_for_ImageNet.ipynb (imagenet) and data/prompts.md (the others)
TEMPLATE_SETS: dict[str, list[str]] = {
    "photo": ["a photo of a {}."],
    "imagenet": [
        "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
        "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
        "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
        "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
        "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
        "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
        "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
        "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
        "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
        "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
        "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
        "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
        "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
        "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
        "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
        "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
        "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
        "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
        "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
        "a photo of a small {}.", "a tattoo of the {}.",
    ],
    "flowers102": ["a photo of a {}, a type of flower."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "food101": ["a photo of {}, a type of food."],
    "birdsnap": ["a photo of a {}, a type of bird."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "stanford_cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."],
}
SIGMOID_TYPES = {"siglip", "siglip2"}


def _features(out: Any) -> Any:
    """`get_*_features` returns a tensor or (newer transformers) an output whose pooler_output is the embedding."""
    return getattr(out, "pooler_output", out)


def _normalise(x: Any) -> Any:
    return x / x.norm(dim=-1, keepdim=True)


class ContrastiveClassifier:
    """A two-tower model with one ensembled, normalised text embedding per class."""

    def __init__(self, path: str, names: list[str], templates: list[str], device: Any, batch_size: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        try:
            self.model = AutoModel.from_pretrained(path).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"zero_shot: cannot load the contrastive model {path!r}: {e}") from e
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "get_image_features")):
            raise UserError(f"zero_shot: {path!r} is a {type(self.model).__name__}, not a two-tower image-text model; "
                            "give `model:` a CLIP or SigLIP checkpoint that has its text tower.")
        self.device = device
        self.sigmoid = self.model.config.model_type in SIGMOID_TYPES
        padding = "max_length" if self.sigmoid else True
        max_length = int(self.model.config.text_config.max_position_embeddings)  # CLIP 77, SigLIP 64
        tok = self.processor.tokenizer
        with torch.no_grad():
            texts = [t.format(n) for n in names for t in templates]
            emb = []
            for i in range(0, len(texts), batch_size):
                batch = tok(texts[i:i + batch_size], padding=padding, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
                emb.append(_normalise(_features(self.model.get_text_features(**batch)).float()))
            per_template = torch.cat(emb).view(len(names), len(templates), -1)
        self.class_embeddings = _normalise(per_template.mean(1))  # [C, D]
        self.scale = float(self.model.logit_scale.detach().exp())
        bias = getattr(self.model, "logit_bias", None)
        self.bias = float(bias.detach()) if bias is not None else 0.0

    def logits(self, images: list[Any]) -> np.ndarray:
        """[B, C]: `scale * cosine (+ bias)` of each image with each class."""
        import torch

        with torch.no_grad():
            pixels = self.processor.image_processor(images=images, return_tensors="pt").to(self.device)
            img = _normalise(_features(self.model.get_image_features(**pixels)).float())
            return (self.scale * img @ self.class_embeddings.T + self.bias).cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.sigmoid:
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)


@TASKS.register("zero_shot")
class ZeroShotTask(Task):
    options = {**DATA_OPTIONS, "templates": Any, "model": str}
    family = "probe"
    headline = "acc"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        spec = cfg.get("templates", "imagenet")
        if isinstance(spec, str):
            if spec not in TEMPLATE_SETS:
                raise UserError(f"task {self.name!r}: unknown template set {spec!r}; known: {sorted(TEMPLATE_SETS)}, "
                                "or give a list of strings with {{}} where the class name goes.")
            spec = TEMPLATE_SETS[spec]
        self.templates = [str(t) for t in spec]
        if not self.templates or any("{}" not in t for t in self.templates):
            raise UserError(f"task {self.name!r}: every template needs '{{}}' where the class name goes: {self.templates}.")
        self._data: ClassificationData | None = None
        self.classifier: ContrastiveClassifier | None = None

    @property
    def data(self) -> ClassificationData:
        if self._data is None:
            self._data = ClassificationData(self.cfg, self.cfg.get("split", "test"))
        return self._data

    def items(self) -> list[dict]:
        return list(self.data.rows)

    def _model_path(self, model: Any) -> str:
        if self.cfg.get("model"):
            return str(self.cfg["model"])
        enc_cfg = getattr(getattr(model, "encoder", None), "cfg", None) or {}
        path = enc_cfg.get("path")
        if enc_cfg.get("type") in ("clip", "siglip") and path and not str(path).startswith("zoo:"):
            return str(path)
        raise UserError(f"task {self.name!r}: the evaluated model has no CLIP/SigLIP encoder checkpoint to take the "
                        "text tower from; give `model: <CLIP or SigLIP dir or hub id>` in the task config.")

    def prepare(self, model: Any, task_dir: Path) -> dict[str, Any]:
        import torch

        path = self._model_path(model)
        device = getattr(model, "device", None) or torch.device("cpu")
        self.classifier = ContrastiveClassifier(path, self.data.names, self.templates, device)
        return {"zero_shot": {"model": path, "num_templates": len(self.templates),
                              "probability": "sigmoid" if self.classifier.sigmoid else "softmax"}}

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        assert self.classifier is not None, "prepare() loads the contrastive model"
        logits = self.classifier.logits([open_image(it["image"], self.data.root) for it in batch])
        probs = self.classifier.probabilities(logits)
        recs = []
        for it, p in zip(batch, probs):
            order = [int(i) for i in np.argsort(-p, kind="stable")[:5]]
            recs.append({"id": it["id"], "label": it["label"], "pred": order[0], "top5": order,
                         "gold_prob": float(p[it["label"]])})
        return recs

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {"acc": {str(r["id"]): float(r["pred"] == r["label"]) for r in records},
                "top5": {str(r["id"]): float(r["label"] in r["top5"]) for r in records},
                "gold_prob": {str(r["id"]): float(r["gold_prob"]) for r in records}}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}
