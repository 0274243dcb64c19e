"""Connectors: output shapes, N', and reference computations for the reducers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from connectors import CONNECTORS, build_connector
from vlm.errors import UserError

DV, DL = 12, 16


def build(cfg, num_tokens=16, grid=(4, 4), vision_dim=DV):
    return build_connector(cfg, vision_dim=vision_dim, llm_dim=DL, num_tokens=num_tokens, patch_grid_size=grid)


@pytest.mark.parametrize("cfg,n_out", [
    ({"type": "linear"}, 16), ({"type": "mlp", "depth": 1}, 16), ({"type": "mlp", "depth": 3}, 16),
    ({"type": "mlp2x_gelu"}, 16), ({"type": "fused_gelu_mlp"}, 16), ({"type": "avgpool"}, 4),
    ({"type": "avgpool", "factor": 4}, 1), ({"type": "pixel_shuffle"}, 4),
    ({"type": "pixel_shuffle", "projector": {"type": "linear"}}, 4),
    ({"type": "resampler", "num_queries": 5, "depth": 1, "heads": 4}, 5),
])
def test_shapes_and_num_output_tokens(cfg, n_out):
    conn = build(cfg)
    out = conn(torch.randn(3, 16, DV))
    assert conn.num_output_tokens == n_out
    assert out.shape == (3, n_out, DL)


def test_registry_names():
    build({"type": "linear"})
    assert {"linear", "mlp", "mlp2x_gelu", "fused_gelu_mlp", "avgpool", "pixel_shuffle", "resampler"} <= set(CONNECTORS.names())


def test_mlp2x_gelu_is_llava_projector():
    conn = build({"type": "mlp2x_gelu"})
    kinds = [type(m) for m in conn.layers]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    assert (conn.layers[0].in_features, conn.layers[0].out_features) == (DV, DL)
    assert (conn.layers[2].in_features, conn.layers[2].out_features) == (DL, DL)
    assert set(conn.state_dict()) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    x = torch.randn(2, 16, DV)
    ref = conn.layers[2](nn.functional.gelu(conn.layers[0](x)))
    torch.testing.assert_close(conn(x), ref)
    with pytest.raises(UserError):
        build({"type": "mlp2x_gelu", "depth": 3})


def test_mlp_depth_structure():
    conn = build({"type": "mlp", "depth": 3})
    assert [type(m) for m in conn.layers] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    with pytest.raises(UserError):
        build({"type": "mlp", "depth": 0})


def test_fused_gelu_mlp_is_prismatic_shape():
    conn = build({"type": "fused_gelu_mlp"})
    lin = [m for m in conn.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(DV, 4 * DV), (4 * DV, DL), (DL, DL)]
    assert sum(isinstance(m, nn.GELU) for m in conn.layers) == 2


def test_avgpool_equals_hand_computed_mean():
    conn = build({"type": "avgpool", "projector": {"type": "linear"}}, num_tokens=6 * 4, grid=(4, 6))
    with torch.no_grad():
        conn.projector.proj.weight.copy_(torch.eye(DL, DV))
        conn.projector.proj.bias.zero_()
    x = torch.randn(2, 24, DV)
    out = conn(x)
    grid = x.reshape(2, 4, 6, DV)
    # output token (i, j), row-major over the 2x3 pooled grid, is the mean of a 2x2 block
    for i in range(2):
        for j in range(3):
            block = grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 4, DV).mean(1)
            torch.testing.assert_close(out[:, i * 3 + j, :DV], block)
    assert torch.all(out[..., DV:] == 0)


def test_pixel_shuffle_is_a_permutation_of_neighbourhoods():
    conn = build({"type": "pixel_shuffle"}, num_tokens=16, grid=(4, 4))
    x = torch.arange(2 * 16 * DV, dtype=torch.float32).reshape(2, 16, DV)
    y = conn.space_to_depth(x)
    assert y.shape == (2, 4, 4 * DV)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    grid = x.reshape(2, 4, 4, DV)
    # output token (1, 0) holds grid rows 2-3, cols 0-1, in row-major order
    expect = torch.cat([grid[:, 2, 0], grid[:, 2, 1], grid[:, 3, 0], grid[:, 3, 1]], dim=-1)
    assert torch.equal(y[:, 2], expect)
    assert conn.projector.layers[0].in_features == 4 * DV


@pytest.mark.parametrize("kind", ["avgpool", "pixel_shuffle"])
def test_reducers_reject_bad_grids(kind):
    with pytest.raises(UserError, match="not divisible"):
        build({"type": kind}, num_tokens=15, grid=(3, 5))
    with pytest.raises(UserError, match="grid"):
        build({"type": kind}, num_tokens=16, grid=None)
    with pytest.raises(UserError, match="does not match"):
        build({"type": kind}, num_tokens=17, grid=(4, 4))


def test_resampler_validation_and_gradients():
    with pytest.raises(UserError, match="heads"):
        build({"type": "resampler", "heads": 5})
    conn = build({"type": "resampler", "num_queries": 3, "depth": 2, "heads": 2})
    x = torch.randn(2, 16, DV, requires_grad=True)
    conn(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # queries do not depend on the number of input tokens
    assert conn(torch.randn(2, 7, DV)).shape == (2, 3, DL)


def test_unknown_connector_is_user_error():
    with pytest.raises(UserError, match="mlp"):
        build({"type": "mlpp"})
