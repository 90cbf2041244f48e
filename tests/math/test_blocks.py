"""Blocks of training rows (lorif_ray.math.blocks): a layout round-trips every layer, a block keeps its global
rows through slices and casts, resident rows hand out the same rows cast per block, and the Gram pass uses the
factors of a factor block where it can (EK-FAC) and its dense rows vec(u vᵀ) elsewhere."""

import torch

from lorif_ray.math.blocks import GradientBlock, ResidentRows, RowLayout
from lorif_ray.math.kronecker import eigenvalue_sums
from lorif_ray.math.rsvd import GramPass, TensorRows

GEN = torch.Generator().manual_seed(3)


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64).to(dtype)


def _layers(n: int, dtype=torch.float64) -> dict[str, GradientBlock]:
    """Two factor layers of one shape, one of another, and a dense layer: every kind of group."""
    shapes = {"a": (4, 3, 2), "b": (4, 3, 2), "c": (2, 5, 1)}
    layers = {name: GradientBlock(u=_rand(n, d1, c, dtype=dtype), v=_rand(n, d2, c, dtype=dtype))
              for name, (d1, d2, c) in shapes.items()}
    return layers | {"d": GradientBlock(g=_rand(n, 6, dtype=dtype))}


def test_a_layout_round_trips_every_layer_and_blocks_keep_their_global_rows():
    layers = _layers(9)
    layout = RowLayout.of(layers)
    assert [g.names for g in layout.factor_groups] == [["a", "b"], ["c"]] and layout.dense_dims == {"d": 6}
    assert layout.dense_width == 2 * 12 + 10 + 6
    block = layout.train_block(layers, offset=40, ids=[f"t{i}" for i in range(9)])
    back = layout.layer_blocks(block)
    for name, want in layers.items():
        assert torch.equal(back[name].dense(), want.dense())
    part = block.rows(3, 7).cast(torch.float32)
    assert (part.offset, part.ids, len(part)) == (43, ["t3", "t4", "t5", "t6"], 4)
    assert part.factors[0][0].dtype == torch.float32 and part.dense.dtype == torch.float32
    sliced = layout.layer_blocks(part)
    assert torch.equal(sliced["c"].u, layers["c"].u[3:7].float())
    assert torch.equal(sliced["d"].g, layers["d"].g[3:7].float())


def test_resident_rows_keep_their_dtype_and_cast_each_block():
    """bfloat16 rows held as they are, delivered in float64 block by block: the same values, every pass."""
    layers = _layers(10, dtype=torch.bfloat16)
    layout = RowLayout.of(layers)
    rows = ResidentRows(layout, layout.train_block(layers, offset=20), dtype=torch.float64, block_rows=4)
    assert rows.block.factors[0][0].dtype == torch.bfloat16 and rows.nbytes() == rows.block.nbytes()
    for _ in range(2):
        blocks = list(rows.blocks())
        assert [(b.offset, len(b)) for b in blocks] == [(20, 4), (24, 4), (28, 2)]
        assert all(b.dense.dtype == torch.float64 for b in blocks)
        for name in ("a", "c"):
            got = [layout.layer_blocks(b)[name] for b in blocks]
            assert torch.equal(torch.cat([b.u for b in got]), layers[name].u.double())
            assert torch.equal(torch.cat([b.v for b in got]), layers[name].v.double())
    assert rows.passes == 2


def test_the_gram_pass_uses_factors_for_ekfac_and_dense_rows_for_the_rest():
    """One pass over factor blocks: GᵀG Q from vec(u vᵀ) formed block by block equals the dense rows' product,
    and Λ* from the factors equals Λ* of the dense rows (the factors' rotation is exact)."""
    layers = _layers(23)
    dense = {n: GradientBlock(g=b.dense()) for n, b in layers.items()}
    q = _rand(12, 5)
    basis_a, basis_s = (torch.linalg.qr(_rand(d, d)).Q for d in (4, 3))
    factored = GramPass(TensorRows(layers, batch_rows=7))(applies={"a": q}, eigens={"b": (basis_a, basis_s)})
    expected = GramPass(TensorRows(dense, batch_rows=23))(applies={"a": q}, eigens={"b": (basis_a, basis_s)})
    g = dense["a"].g
    assert torch.allclose(factored["a"], g.T @ (g @ q), rtol=1e-12)
    assert torch.allclose(factored["b"], expected["b"], rtol=1e-12)
    assert torch.allclose(eigenvalue_sums(layers["b"], basis_a, basis_s), expected["b"], rtol=1e-12)
