"""A deterministic rule-based stand-in for a VLM, so task logic can be checked exactly.

It "sees" an image as the description registered for the colour of its top-left pixel. A text's
log-prob is -0.1 per word found in that description and -2.0 per other word (sum over words; mean =
sum / words). A one-letter continuation scores the option text that letter labels in the prompt
(with its mean). "Yes"/"No" continuations score -0.1 when they agree with `answer()`, else -3.
`generate` returns `answer()`: a fixed answer when the prompt contains a key of `answers`, else simple
rules for options, "What type of object", "Is there a X", and caption questions.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class FakeEncoder(nn.Module):
    has_cls = False
    select_tokens = "patch"
    hidden_size = 3

    def preprocess(self, images: list) -> torch.Tensor:
        return torch.tensor([[c / 255.0 for c in im.getpixel((0, 0))] for im in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, None, :].repeat(1, 4, 1)


class _Tok:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 97 for c in text]}


class _LLM:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.tokenizer = _Tok()
        self.model = nn.Module()
        self.model.emb = nn.Embedding(97, 16)
        self.model.get_input_embeddings = lambda: self.model.emb


class FakeVLM:
    def __init__(self, vision: dict[tuple, str], answers: dict[str, str] | None = None, with_llm: bool = False) -> None:
        self.vision = vision
        self.answers = answers or {}
        self.encoder = FakeEncoder()
        self.calls = {"score": 0, "generate": 0, "continuations": 0}
        if with_llm:
            self.llm = _LLM()

    def see(self, image: Any) -> str:
        if image is None:
            return ""
        if isinstance(image, list):
            image = image[0]
        px = image.getpixel((0, 0))  # nearest registered colour (JPEG shifts colours a little)
        return self.vision[min(self.vision, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, px)))]

    @staticmethod
    def text_lp(desc: str, text: str) -> tuple[float, int]:
        seen = set(words(desc))
        ws = words(text)
        return sum(-0.1 if w in seen else -2.0 for w in ws), max(len(ws), 1)

    def answer(self, desc: str, prompt: str) -> str:
        for key, ans in self.answers.items():
            if key in prompt:
                return ans
        options = re.findall(r"^([A-Z])\. (.+)$", prompt, re.M)
        if options:
            best = max(options, key=lambda o: (lambda s, n: s / n)(*self.text_lp(desc, o[1])))
            return f"{best[0]}."
        if "What type of object" in prompt:
            return f"It is a {desc}."
        m = re.search(r"Is there an? (.+?) in (?:the|this) image", prompt)
        if m:
            stem = lambda t: {w.rstrip("s") for w in words(t)}  # noqa: E731
            return "Yes" if stem(m.group(1)) <= stem(desc) else "No"
        m = re.search(r"describe the image\? (.+)\n", prompt)
        if m:
            return "Yes" if set(words(m.group(1))) <= set(words(desc)) else "No"
        return desc

    def score(self, images: list, prompts: list[str], continuations: list[list[str]], chat_template: bool = True) -> list:
        assert len(images) == len(prompts) == len(continuations)
        self.calls["score"] += 1
        out = []
        for im, prompt, conts in zip(images, prompts, continuations):
            desc = self.see(im)
            res = []
            for c in conts:
                self.calls["continuations"] += 1
                opt = re.search(rf"^{re.escape(c)}\. (.+)$", prompt, re.M) if re.fullmatch(r"[A-Z]", c) else None
                if opt:
                    s, n = self.text_lp(desc, opt.group(1))
                    s, n = s / n, 1
                elif c in ("Yes", "No"):
                    s, n = (-0.1 if self.answer(desc, prompt).lower().startswith(c.lower()) else -3.0), 1
                else:
                    s, n = self.text_lp(desc, c)
                res.append({"sum_logprob": s, "mean_logprob": s / n, "num_tokens": n})
            out.append(res)
        return out

    def generate(self, images: list, prompts: list[str], chat_template: bool = True, max_new_tokens: int = 32) -> list[str]:
        assert len(images) == len(prompts)
        self.calls["generate"] += 1
        return [self.answer(self.see(im), p) for im, p in zip(images, prompts)]
