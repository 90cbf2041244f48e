"""Stage 2's orthonormalization: Householder QR against the Gram-based CholeskyQR2 (``rsvd.orthonormal_columns``).

    python bench/orthonormal_cpu.py            # prints a Markdown table

One layer's randomized spectrum (Woodbury's fit: r=64, p=10, 3 power passes + the last) over resident rows of a
spiked spectrum, D = 128×128, with torch pinned to 1 thread and then oversubscribed (4 and 8 threads on this
2-core machine, as happens under load when every process takes torch's default). Each cell: the median of 3
alternated runs, the whole fit (passes over the rows included) and the orthonormalizations alone. The two
paths give the same spectrum (the largest relative difference of σ² is printed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorif_ray.math import rsvd


def householder(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def spiked_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) float32 rows whose Gram spectrum decays like j^-2 after a few spikes (σ₁²/σ_64² ~ 1e4)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float32) ** -1.0
    scale[:4] *= torch.tensor([30.0, 20.0, 10.0, 5.0])
    return torch.randn(n, dim, generator=gen) * scale[torch.randperm(dim, generator=gen)]


def fit(rows: torch.Tensor, orthonormal) -> tuple[float, float, torch.Tensor]:
    """(seconds of the fit, seconds in the orthonormalizations, σ²) with ``orthonormal`` as stage 2's."""
    spent = [0.0]

    def timed(y):
        start = time.perf_counter()
        q = orthonormal(y)
        spent[0] += time.perf_counter() - start
        return q

    rsvd.orthonormal_columns, former = timed, rsvd.orthonormal_columns
    try:
        start = time.perf_counter()
        spectrum = rsvd.randomized_spectrum(rsvd.GramOperator(rsvd.TensorRows(rows, batch_rows=256)), rows.shape[1],
                                            64, oversample=10, power_iters=3, seed=1)
        return time.perf_counter() - start, spent[0], spectrum.values
    finally:
        rsvd.orthonormal_columns = former


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--side", type=int, default=128, help="D = side²")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    rows = spiked_rows(args.rows, args.side ** 2)
    print(f"N={args.rows}, D={args.side ** 2}, r=64, p=10, q=3, float32 passes\n")
    print("| threads | fit, Householder (s) | fit, CholeskyQR2 (s) | orthonormalizations, Householder (s) "
          "| orthonormalizations, CholeskyQR2 (s) | max rel. diff of σ² |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = {"householder": [], "cholesky": []}
        values = {}
        for _ in range(3):
            for name, orthonormal in (("householder", householder), ("cholesky", rsvd.orthonormal_columns)):
                seconds, ortho, values[name] = fit(rows, orthonormal)
                runs[name].append((seconds, ortho))
        diff = float(((values["cholesky"] - values["householder"]).abs() / values["householder"]).max())
        med = {name: (statistics.median(s for s, _ in r), statistics.median(o for _, o in r)) for name, r in runs.items()}
        print(f"| {threads} | {med['householder'][0]:.3f} | {med['cholesky'][0]:.3f} | {med['householder'][1]:.3f} "
              f"| {med['cholesky'][1]:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
