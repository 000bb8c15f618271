"""TSV-M and EpiMer on ViT-B/32-shaped task vectors: time of the all-at-once merge and its error.

Compares the mergers (``strategies/tsv_merge.py``, ``strategies/epimer.py``: the shared Gram/eigh
spectral kernel; EpiMer's averaged-curvature Gram) with a plain implementation of the same formulas
written here: ``torch.linalg.svd`` per matrix for the per-task rank-k factors and for the Procrustes
polar factors (as FusionBench), and for EpiMer the literal H̃_t = Sᵀ diag(v_t + ε) S for every task,
H̄ = Σ λ_t H̃_t, δ̃ = α T H̄⁻¹ Σ λ_t H̃_t δ̃_t.

Inputs: the 2-D weights of the first ``--blocks`` residual blocks of open_clip's ViT-B/32 image tower
(random init), with the stacked q/k/v projection cut into its three 768 × 768 blocks as the HF CLIP
towers of the papers have them (per block: q, k, v, out 768 × 768, fc 3072 × 768, proj 768 × 3072);
8 synthetic task vectors (``vit_weights.task_vector``) and 8 random Fisher diagonals. The per-block
cost is the same for all 12 blocks, so the ratio holds for the whole tower; the plain EpiMer costs
~1 min per block on one core.

Timing: the two implementations alternate A B A B …, ``--pairs`` pairs (≥ 3), median of each; the
ratio is median(merger) / median(plain). Error: ‖Δ_merger − Δ_plain‖_F / ‖Δ_plain‖_F over all
matrices together, and the worst single matrix; and, to see which of the two float32 results is the
more exact, both against the merger run in float64 throughout (float64 inputs: float64 Gram, eigh,
curvature; the formula itself is checked against explicit-basis oracles in the tests).

    nice -n 10 .venv/bin/python benchmarks/perf/multitask_merge.py [--blocks 1] [--pairs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

import cl_merge  # noqa: F401  (torchvision shim before open_clip)
from vit_weights import task_vector, vit_b32_tower  # noqa: E402
from cl_merge.strategies.epimer import EpiMerMerger  # noqa: E402
from cl_merge.strategies.tsv_merge import TSVMerger  # noqa: E402


def matrices(blocks: int) -> dict:
    tower = vit_b32_tower()
    out = {}
    for b in range(blocks):
        pre = f"transformer.resblocks.{b}."
        q, k, v = tower[pre + "attn.in_proj_weight"].chunk(3, 0)
        out.update({pre + "q": q.clone(), pre + "k": k.clone(), pre + "v": v.clone(),
                    pre + "out": tower[pre + "attn.out_proj.weight"],
                    pre + "fc": tower[pre + "mlp.c_fc.weight"], pre + "proj": tower[pre + "mlp.c_proj.weight"]})
    return out


# ---- the plain implementations (one LAPACK SVD per matrix, literal formulas) --------------------

def _plain_factors(deltas, k):
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    uu, _, uvh = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    vu, _, vvh = torch.linalg.svd(torch.cat(vs, 1), full_matrices=False)
    return uu @ uvh, torch.cat(ss), vu @ vvh


def plain_tsv(deltas, k, alpha):
    u, s, v = _plain_factors(deltas, k)
    return alpha * (u * s) @ v.T


def _gram(u, v, w):
    """Sᵀ diag(vec w) S, S = [vec(u_i v_iᵀ)], in row chunks."""
    p, n = u.shape[1], v.shape[0]
    rows = max(1, (1 << 23) // (n * p))
    h = u.new_zeros(p, p)
    for a in range(0, u.shape[0], rows):
        y = (u[a:a + rows, None, :] * v[None]).reshape(-1, p)
        h += y.T @ (y * w[a:a + rows].reshape(-1, 1))
    return h


def plain_epimer(deltas, fishers, k, alpha, eps_rel):
    u, s, v = _plain_factors(deltas, k)
    tasks = len(deltas)
    jitter = eps_rel * float(torch.stack(fishers).double().mean())
    h_t = [_gram(u, v, f + jitter) for f in fishers]  # the T projected curvatures, literally
    coords = [torch.zeros_like(s) for _ in range(tasks)]
    for t in range(tasks):
        coords[t][t * k:(t + 1) * k] = s[t * k:(t + 1) * k]  # tagged: own atoms, own σ
    h_bar = sum(h / tasks for h in h_t).double()
    rhs = sum((h @ c) / tasks for h, c in zip(h_t, coords)).double()
    x = torch.linalg.solve(h_bar, rhs)
    return ((u.double() * (alpha * tasks * x)) @ v.double().T).float()


# ---- measurement ------------------------------------------------------------------------------

def rel_error(fast: dict, ref: dict):
    num = sum(float((fast[n] - ref[n]).double().norm()) ** 2 for n in ref)
    den = sum(float(ref[n].double().norm()) ** 2 for n in ref)
    worst = max(float((fast[n] - ref[n]).double().norm() / ref[n].double().norm()) for n in ref)
    return math.sqrt(num / den), worst


def alternate(fast_fn, plain_fn, pairs):
    fast_t, plain_t, out = [], [], None
    for _ in range(pairs):
        t0 = time.perf_counter()
        fast = fast_fn()
        fast_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain = plain_fn()
        plain_t.append(time.perf_counter() - t0)
        out = (fast, plain)
    return statistics.median(fast_t), statistics.median(plain_t), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1, help="residual blocks of the tower (1..12)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=32, help="per-task rank (the supplement's k = 32)")
    ap.add_argument("--kind", choices=["gaussian", "finetune"], default="gaussian")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--only", choices=["tsv_m", "epimer"], default=None)
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 reference")
    args = ap.parse_args()
    if args.pairs < 3:
        ap.error("--pairs must be >= 3 (median of at least 3 alternating pairs)")
    torch.set_num_threads(args.threads)
    base = matrices(args.blocks)
    gen = torch.Generator().manual_seed(0)
    tvs = [task_vector(base, args.kind, gen) for _ in range(args.tasks)]
    experts = [{n: base[n] + d[n] for n in base} for d in tvs]
    fishers = [{n: torch.rand(v.shape, generator=gen).pow(4) * 1e-4 for n, v in base.items()} for _ in tvs]
    # what both implementations merge: the rounded differences, as merge_all forms them
    deltas = {n: [e[n] - base[n] for e in experts] for n in base}
    print(f"{len(base)} matrices of {args.blocks} ViT-B/32 block(s) ({sum(v.numel() for v in base.values()) / 1e6:.1f}M "
          f"weights), T = {args.tasks} {args.kind} task vectors, k = {args.k}; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    def run(merger, plain_one, name):
        def fast():
            out = merger.merge_all(base, experts, fishers=fishers)
            return {n: out[n] - base[n] for n in base}

        def plain():
            return {n: plain_one(n) for n in base}

        tf, tp, (fo, po) = alternate(fast, plain, args.pairs)
        err, worst = rel_error(fo, po)
        f64 = ""
        if not args.no_f64:
            dbl = lambda s: {n: v.double() for n, v in s.items()}  # noqa: E731
            ref = merger.merge_all(dbl(base), [dbl(e) for e in experts], fishers=[dbl(f) for f in fishers])
            ref = {n: ref[n] - base[n].double() for n in base}
            f64 = (f"; vs float64: merger {rel_error(fo, ref)[0]:.1e}, plain {rel_error(po, ref)[0]:.1e}")
        print(f"[{name}] merger {tf:.2f} s, plain torch.linalg.svd {tp:.2f} s (medians of {args.pairs} A/B pairs): "
              f"ratio {tf / tp:.2f}x (target <= 0.5x); rel. error {err:.1e} (worst matrix {worst:.1e}; "
              f"target <= 1e-4){f64}; load average {os.getloadavg()[0]:.2f}", flush=True)

    if args.only in (None, "tsv_m"):
        run(TSVMerger(k=args.k, alpha=1.0), lambda n: plain_tsv(deltas[n], args.k, 1.0), "tsv_m")
    if args.only in (None, "epimer"):
        fs = {n: [f[n] for f in fishers] for n in base}
        run(EpiMerMerger(k=args.k, alpha=1.0), lambda n: plain_epimer(deltas[n], fs[n], args.k, 1.0, 1e-6), "epimer")


if __name__ == "__main__":
    main()
