"""Error study behind the refined truncated-SVD route of ``cl_merge/spectral.py``.

For every case (shape, spectrum, k) it prints the relative error of the rank-k reconstruction
U diag(σ) Vᵀ against a float64 LAPACK SVD of the same float32 matrix, for

* ``gram32``: the plain float32 Gram/eigh route (what ``ε32·κ_k² ≤ 1e-5`` admits),
* ``refined``: float64 Rayleigh–Ritz on the q = 2k + 16 leading float32 eigenvectors,
* ``svd32``: a float32 LAPACK SVD (the plain reference implementations' own error),

with the refined route's predicted error (``refined_error_estimate``) and measured / predicted.
The constant ``TRUNCATED_OMEGA`` is chosen from the worst measured / worst-case ratio here (with a
2× margin), and ``truncated_svd`` takes the refined route when the prediction is ≤
``TRUNCATED_SVD_BOUND``; the last column says which route ``truncated_svd(…, "auto")`` takes.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/perf/truncated_svd_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import zlib

import torch

from cl_merge.spectral import (EPS32, TRUNCATED_FLOOR, TRUNCATED_OMEGA, TRUNCATED_SVD_BOUND, _descending, _refined_top,
                               oversampled_size, refined_error_estimate, truncated_svd)


def spectrum_case(m: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``ft:<noise>``: rank-8 decaying signal + noise (benchmarks' fine-tuning-like task vectors, noise
    0.05 there); ``decay:<d>``: exact singular values logspace(0, −d); ``power``: σ_i = i^−1."""
    name, _, arg = kind.partition(":")
    if name == "ft":
        left, right = torch.randn(m, 8, generator=gen), torch.randn(8, n, generator=gen)
        return (torch.randn(m, n, generator=gen) * 1e-3 * float(arg)
                + (left * torch.logspace(0, -2, 8)) @ right * 1e-3 / math.sqrt(n))
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    if name == "decay":
        s = torch.logspace(0, -float(arg), r, dtype=torch.float64)
    elif name == "power":
        s = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return ((u * s) @ v.T).float()


def reconstruction_error(u, s, v, ref) -> float:
    return float((((u.double() * s.double()) @ v.double().T) - ref).norm() / ref.norm())


def study_case(a: torch.Tensor, k: int) -> dict:
    """Every route's error on one matrix (module doc)."""
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    ref = (u64[:, :k] * s64[:k]) @ vh64[:k]
    tall = a.T if a.shape[0] < a.shape[1] else a
    lam, vec = torch.linalg.eigh(tall.T @ tall)
    lam, vec = _descending(lam.double(), vec)
    left = (tall @ vec[:, :k]) / lam[:k].sqrt().float()
    gram32 = reconstruction_error(left, lam[:k].sqrt(), vec[:, :k], ref if tall is a else ref.T)
    q = oversampled_size(k, tall.shape[1])
    estimate = refined_error_estimate(lam, k, q)
    import cl_merge.spectral as spectral
    saved = spectral.TRUNCATED_SVD_BOUND
    spectral.TRUNCATED_SVD_BOUND = math.inf  # measure the refined route even where it is not taken
    try:
        mu, v_r, b = _refined_top(tall, lam, vec, k)
    finally:
        spectral.TRUNCATED_SVD_BOUND = saved
    refined = reconstruction_error(b / mu.sqrt(), mu.sqrt(), v_r, ref if tall is a else ref.T)
    us, ss, vhs = torch.linalg.svd(a, full_matrices=False)
    svd32 = reconstruction_error(us[:, :k], ss[:k], vhs[:k].T, ref)
    u, s, v = truncated_svd(a, k, "auto")
    auto = reconstruction_error(u, s, v, ref)
    kappa = float(s64[0] / s64[k - 1])
    if EPS32 * kappa ** 2 <= 1e-5:
        route = "float32"
    elif estimate <= TRUNCATED_SVD_BOUND:
        route = "refined"
    else:
        route = "float64"
    return dict(kappa=kappa, gram32=gram32, refined=refined, estimate=estimate, svd32=svd32, auto=auto,
                route=route)


CASES = [(768, 768), (3072, 768), (768, 3072)]
KINDS = ["ft:0.05", "ft:0.2", "ft:1.0", "decay:1", "decay:3", "decay:6", "power"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="768 × 768 and 3072 × 768 only, k = 32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = CASES[:2] if args.quick else CASES
    ks = (32,) if args.quick else (8, 32, 96)
    print(f"TRUNCATED_OMEGA {TRUNCATED_OMEGA}, TRUNCATED_FLOOR {TRUNCATED_FLOOR:.1e}, TRUNCATED_SVD_BOUND {TRUNCATED_SVD_BOUND:.0e}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape':>10s} {'spectrum':>8s} {'k':>3s} {'σ1/σk':>8s} {'gram32':>8s} {'refined':>8s} "
          f"{'predicted':>9s} {'meas/pred':>9s} {'svd32':>8s} {'auto':>8s} route")
    worst = 0.0
    for m, n in shapes:
        for kind in KINDS:
            for k in ks:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{m} {n} {kind} {k}".encode()))
                r = study_case(spectrum_case(m, n, kind, gen), k)
                ratio = r["refined"] / r["estimate"] if r["estimate"] > 0 else 0.0
                worst = max(worst, ratio)
                print(f"{m:>4d}×{n:<5d} {kind:>8s} {k:3d} {r['kappa']:8.1e} {r['gram32']:8.1e} {r['refined']:8.1e} "
                      f"{r['estimate']:9.1e} {ratio:9.2f} {r['svd32']:8.1e} {r['auto']:8.1e} {r['route']}",
                      flush=True)
    print(f"worst measured / predicted: {worst:.2f} (≤ 1 means the prediction bounds every measured error)")


if __name__ == "__main__":
    main()
