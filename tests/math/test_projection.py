import pytest
import torch

from lorif_ray.errors import ConfigError
from lorif_ray.math.projection import layer_projection, projected_dims


def test_regenerable_and_distinct_per_layer():
    a = layer_projection(3, "h.0.attn", 64, 96, 4)
    b = layer_projection(3, "h.0.attn", 64, 96, 4)
    c = layer_projection(3, "h.1.attn", 64, 96, 4)
    d = layer_projection(4, "h.0.attn", 64, 96, 4)
    assert a.p_in.shape == (64, 16) and a.p_out.shape == (96, 24)
    assert torch.equal(a.p_in, b.p_in) and torch.equal(a.p_out, b.p_out)
    assert not torch.allclose(a.p_in, c.p_in) and not torch.allclose(a.p_in, d.p_in)
    assert not torch.allclose(a.p_in[:16, :16], a.p_out[:16, :16])


def test_same_values_in_every_dtype():
    a = layer_projection(0, "x", 40, 40, 2, dtype=torch.float64)
    b = layer_projection(0, "x", 40, 40, 2, dtype=torch.float32)
    assert torch.allclose(a.p_in.float(), b.p_in)


def test_gaussian_scaled_by_inverse_sqrt_d():
    p = layer_projection(0, "wide", 4096, 8, 16, dtype=torch.float64).p_in  # (4096, 256)
    assert abs(float(p.var()) * 256 - 1.0) < 0.02
    x = torch.randn(4096, dtype=torch.float64)
    assert abs(float((x @ p).norm() ** 2 / x.norm() ** 2) - 1.0) < 0.25


def test_invalid_factor():
    with pytest.raises(ConfigError, match="f must be"):
        projected_dims(10, 10, 0)
    assert projected_dims(10, 3, 4) == (2, 1)
