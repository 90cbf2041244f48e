"""The exact curvature (LoGRA) of one layer with fewer rows than columns: the thin form against the D×D one.

    python bench/exact_cpu.py                  # prints a Markdown table

N rows of a layer of D = d1·d2 columns (float64, resident, one thread pinned): ``ExactInverse.fit`` over N rows
(N + p < D/2: one GᵀG Q pass, V (D×N) and σ²) against the same fit with N unknown (GᵀG formed, D×D eigh), and the
largest relative difference of H⁻¹g for a few random g. The D×D form is run only up to ``--dd-max``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorif_ray.math.curvature import ExactInverse, FitSettings
from lorif_ray.math.rsvd import GramOperator, TensorRows


def timed_fit(g: torch.Tensor, rows: int | None) -> tuple[float, ExactInverse]:
    start = time.perf_counter()
    fitted = ExactInverse.fit(GramOperator(TensorRows(g, batch_rows=256)), g.shape[1], "layer", FitSettings(rows=rows))
    return time.perf_counter() - start, fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096, 16384])
    parser.add_argument("--dd-max", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"N = {args.rows}, float64, 1 thread\n")
    print("| D | thin fit (s) | saved (MiB) | D×D fit (s) | saved (MiB) | max rel. diff of H⁻¹g |")
    print("|---|---|---|---|---|---|")
    for dim in args.dims:
        gen = torch.Generator().manual_seed(dim)
        g = torch.randn(args.rows, dim, generator=gen, dtype=torch.float64)
        g[:, :3] *= torch.tensor([40.0, 15.0, 6.0], dtype=torch.float64)
        thin_s, thin = timed_fit(g, args.rows)
        thin_mib = sum(t.numel() * 8 for t in thin.tensors().values()) / 2**20
        cells = ["–", "–", "–"]
        if dim <= args.dd_max:
            full_s, full = timed_fit(g, None)
            probe = torch.randn(8, dim, generator=gen, dtype=torch.float64)
            want = full.precondition(probe)
            diff = float(((thin.precondition(probe) - want).norm(dim=1) / want.norm(dim=1)).max())
            cells = [f"{full_s:.2f}", f"{full.inverse.numel() * 8 / 2**20:.0f}", f"{diff:.1e}"]
        print(f"| {dim:,} | {thin_s:.2f} | {thin_mib:.0f} | {cells[0]} | {cells[1]} | {cells[2]} |")


if __name__ == "__main__":
    main()
