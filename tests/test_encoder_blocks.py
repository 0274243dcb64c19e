"""`partial` freezing trains the last k blocks that feed the selected features (issue 17, point 6).

Blocks after `select_layer` run but never see a gradient; a fused encoder counts k per member; a CNN's stages
after the selected feature map lie outside the graph. The proof: every parameter that `partial` marks trainable
receives a nonzero gradient from the encoder's output. Tiny random configs of the real HF / timm architectures.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import build_encoder
from vlm.errors import UserError
from vlm.recipe.freeze import partial_blocks

VIT = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7)
CONFIGS = {
    "clip": {"type": "clip", "config": {**VIT, "intermediate_size": 32}},
    "siglip": {"type": "siglip", "config": {**VIT, "intermediate_size": 32}},
    "dinov2": {"type": "dinov2", "config": {**VIT, "mlp_ratio": 2}},
    "dinov2_reg": {"type": "dinov2", "config": {**VIT, "mlp_ratio": 2, "num_register_tokens": 2}},
    "timm_vit": {"type": "timm", "model": "vit_tiny_patch16_224",
                 "config": dict(depth=3, embed_dim=16, num_heads=2, img_size=28, patch_size=7)},
}
CNNS = {  # name → (timm kwargs, image size)
    "resnet18": ({"layers": [1, 1, 1, 1], "zero_init_last": False}, 64),  # timm zeroes the last BN gamma: no grad
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_050": ({}, 64),
}


def pixels_for(e) -> torch.Tensor | dict:
    from PIL import Image

    return e.preprocess([Image.new("RGB", (40, 30), (200, 30, 90)), Image.new("RGB", (30, 40), (10, 120, 250))])


def train_partial(e: nn.Module, k: int) -> list[nn.Module]:
    """Mark the `partial` blocks trainable (the policy's own selection), run forward + backward; return them."""
    blocks = partial_blocks(e, k, "test.vision")
    for p in e.parameters():
        p.requires_grad_(False)
        p.grad = None
    for b in blocks:
        for p in b.parameters():
            p.requires_grad_(True)
    out = e(pixels_for(e))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return blocks


def assert_every_trained_parameter_has_a_gradient(e: nn.Module) -> None:
    trained = [(n, p) for n, p in e.named_parameters() if p.requires_grad]
    assert trained
    dead = [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"trained under partial but no gradient: {dead[:5]}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("select_layer,used", [(-2, 2), (-1, 3), (1, 1)])
def test_vit_partial_trains_only_blocks_that_feed_the_selected_layer(name, select_layer, used):
    e = build_encoder({**CONFIGS[name], "select_layer": select_layer})
    stack = list(e.model.blocks) if name == "timm_vit" else next(
        m for m in e.model.modules() if isinstance(m, nn.ModuleList) and len(m) == 3)
    assert [id(b) for b in e.blocks()] == [id(b) for b in stack[:used]]
    for k in range(1, used + 1):
        blocks = train_partial(e, k)
        assert [id(b) for b in blocks] == [id(b) for b in stack[used - k:used]]
        assert_every_trained_parameter_has_a_gradient(e)
    with pytest.raises(UserError, match=f"partial k={used + 1} but the module has only {used} blocks"):
        partial_blocks(e, used + 1, "test.vision")


def test_select_layer_zero_leaves_no_block_to_train():
    e = build_encoder({**CONFIGS["clip"], "select_layer": 0})  # the embeddings: no transformer layer feeds them
    assert len(e.blocks()) == 0
    with pytest.raises(UserError, match="stacked blocks"):
        partial_blocks(e, 1, "test.vision")


@pytest.mark.parametrize("name", list(CNNS))
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_cnn_partial_trains_only_stages_inside_the_graph(name, select_layer):
    kwargs, size = CNNS[name]
    e = build_encoder({"type": "timm", "model": name, "config": kwargs, "image_size": size,
                       "select_layer": select_layer})
    feature = e.model.feature_info[select_layer]["module"]
    last = e.blocks()[-1]
    assert last is e.model.get_submodule(feature) or any(m is e.model.get_submodule(feature) for m in last.modules())
    k = min(2, len(e.blocks()))
    train_partial(e, k)
    assert_every_trained_parameter_has_a_gradient(e)


def test_efficientnet_last_stages_outside_the_graph_are_not_blocks():
    # efficientnet_b0 has 7 stages; its penultimate feature map is the output of blocks.4, so blocks.5 and
    # blocks.6 never see a gradient (the old count trained blocks.5 for k=1)
    e = build_encoder({"type": "timm", "model": "efficientnet_b0", "image_size": 64, "select_layer": -2})
    assert len(e.blocks()) == 5 and e.blocks()[-1] is e.model.blocks[4]
    # mobilenetv3's last "stage" (blocks.6, a 1x1 conv) follows its last feature map (blocks.5)
    m = build_encoder({"type": "timm", "model": "mobilenetv3_small_050", "image_size": 64, "select_layer": -1})
    assert len(m.blocks()) == 6 and m.blocks()[-1] is m.model.blocks[5]


def fused(k_layers=(3, 3), select_layers=(-2, -2)) -> nn.Module:
    s = {**CONFIGS["siglip"], "config": {**CONFIGS["siglip"]["config"], "num_hidden_layers": k_layers[0]},
         "select_layer": select_layers[0]}
    d = {**CONFIGS["dinov2"], "config": {**CONFIGS["dinov2"]["config"], "num_hidden_layers": k_layers[1]},
         "select_layer": select_layers[1]}
    return build_encoder({"type": "fused", "encoders": [s, d]})


@pytest.mark.parametrize("k", [1, 2])
def test_fused_partial_counts_k_per_member(k):
    e = fused()
    blocks = train_partial(e, k)
    sig, dino = (list(g) for g in e.block_groups())
    assert len(sig) == len(dino) == 2  # 3 layers, penultimate selected: 2 feed each member's output
    assert [id(b) for b in blocks] == [id(b) for b in sig[-k:] + dino[-k:]]
    assert_every_trained_parameter_has_a_gradient(e)
    for member in e.encoders:  # both members train (the old count over the concatenation left DINOv2 frozen at k=1)
        assert any(p.requires_grad for p in member.parameters())


def test_fused_partial_with_unequal_members():
    e = fused(k_layers=(4, 2), select_layers=(-2, -1))  # 3 and 2 blocks feed the output
    assert [len(g) for g in e.block_groups()] == [3, 2] and len(e.blocks()) == 5
    train_partial(e, 2)
    assert_every_trained_parameter_has_a_gradient(e)
    with pytest.raises(UserError, match="k=3.*encoders\\[1\\].*only 2 blocks"):
        partial_blocks(e, 3, "test.vision")


def test_fused_with_a_cnn_member():
    cnn = {"type": "timm", "model": "resnet18", "config": CNNS["resnet18"][0], "image_size": 56}
    e = build_encoder({"type": "fused", "encoders": [CONFIGS["clip"], cnn]})
    train_partial(e, 1)
    assert_every_trained_parameter_has_a_gradient(e)
    assert any(p.requires_grad for p in e.encoders[1].parameters())


def test_encoder_without_blocks_cannot_be_partially_trained():
    from encoders.base import VisionEncoder

    class NoBlocks(VisionEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(UserError, match="stacked blocks"):
        partial_blocks(NoBlocks(), 1, "test.vision")
