"""Adaptive isotropic merge on the ViT-B/32 image tower: time of one merge step and its error.

Compares the merger (Gram/eigh route, float32 or float64 per matrix) with a plain per-matrix SVD
implementation of Eq. 11 on the merger's rule table (torch.linalg.svd per matrix and per q/k/v
block, float32), on random weights; the two alternate A B A B (``--pairs``), ratio = median/median.
Two kinds of task vectors: i.i.d. Gaussian (well-conditioned rectangular, ill-conditioned square
matrices) and "fine-tuning-like" ones (a decaying spectrum: a few strong directions plus noise).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/isotropic_merge.py [--threads 2] [--pairs 3] [--kinds finetune]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

# OpenMP's own wait policy, as in a cl_merge run. On a machine shared with other jobs, spinning
# threads inflate wall times many-fold: run with OMP_WAIT_POLICY=PASSIVE there (printed below).
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")

import torch  # noqa: E402

import cl_merge  # noqa: E402,F401  (torchvision shim before open_clip)
from vit_weights import task_vector, vit_b32_tower  # noqa: E402
from cl_merge.params import is_matrix  # noqa: E402
from cl_merge.strategies.isotropic import IsotropicMerger  # noqa: E402
from cl_merge.tensor_kinds import map_blocks, rule_for  # noqa: E402


def _eq11(d, step):
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    s_bar = s.mean()
    return (u * (s_bar + (s - s_bar) / math.sqrt(step))) @ vh


def plain_svd_merge(base, previous, expert, start, step, rules, lam=0.0, alpha=1.0, dtype=None):
    """Eq. 10–12 written directly with one SVD per matrix (the reference), on the merger's rule table:
    Eq. 11 on "spectral" matrices and on each q/k/v block of "spectral_blocks" ones, the running mean
    elsewhere. ``dtype``: compute in this dtype (float64 for the exactness check)."""
    out = {}
    for k in base:
        b, p, e, s0 = (t if dtype is None else t.to(dtype) for t in (base[k], previous[k], expert[k], start[k]))
        rule = rule_for(k, b, rules)
        if rule == "mean":
            d = ((step - 1) * (p - b) + (e - b)) / step
        else:
            d = (1 + lam) * (p - b) + (1 - lam) * (e - s0)
            if rule == "spectral":
                d = _eq11(d, step)
            elif rule == "spectral_blocks":
                d = map_blocks(lambda x: _eq11(x, step), d)
        out[k] = b + alpha * d
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="alternating merger/reference pairs (>= 3)")
    ap.add_argument("--kinds", default="gaussian,finetune")
    ap.add_argument("--step", type=int, default=3, help="t of the merge step (t = 1 needs no SVD)")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 SVD check (~1 s per matrix)")
    args = ap.parse_args()
    if args.pairs < 3:
        ap.error("--pairs must be >= 3 (median of at least 3 alternating pairs)")
    torch.set_num_threads(args.threads)
    base = vit_b32_tower()
    mats = [k for k, v in base.items() if is_matrix(v)]
    print(f"ViT-B/32 image tower: {sum(v.numel() for v in base.values()) / 1e6:.1f}M parameters, "
          f"{len(mats)} 2-D matrices; threads={args.threads}, load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY {WAIT_POLICY}")
    merger = IsotropicMerger()
    merger.reset(base)
    for kind in args.kinds.split(","):
        gen = torch.Generator().manual_seed(0)
        previous = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        expert = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        fast_times, ref_times, fast_cpu, ref_cpu = [], [], [], []
        for _ in range(args.pairs):  # A B A B …
            t0, c0 = time.perf_counter(), time.process_time()
            fast = merger.merge(base=base, previous=previous, expert=expert, start=base, step=args.step)
            fast_times.append(time.perf_counter() - t0)
            fast_cpu.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            ref = plain_svd_merge(base, previous, expert, base, args.step, merger.rules)
            ref_times.append(time.perf_counter() - t0)
            ref_cpu.append(time.process_time() - c0)
        # error of the update Δ_merged (θ0 itself would hide it) against the float32 SVD reference,
        # and both against Eq. 11 in float64 (one matrix at a time, to keep memory low)
        num_fast = num_ref = num_fr = den = den64 = worst = 0.0
        for k in mats:
            d_fast = (fast[k] - base[k]).double()
            d_ref = (ref[k] - base[k]).double()
            num_fr += float((d_fast - d_ref).norm()) ** 2
            den += float(d_ref.norm()) ** 2
            if args.no_f64:
                continue
            # the same formula in float64 on the float32 inputs: the methods' own error
            one = {n: {k: v[k]} for n, v in (("b", base), ("p", previous), ("e", expert))}
            d64 = (plain_svd_merge(one["b"], one["p"], one["e"], one["b"], args.step, merger.rules,
                                   dtype=torch.float64)[k] - base[k].double())
            e = float((d_fast - d64).norm())
            worst = max(worst, e / float(d64.norm()))
            num_fast += e ** 2
            num_ref += float((d_ref - d64).norm()) ** 2
            den64 += float(d64.norm()) ** 2
        f64 = ("" if args.no_f64 else
               f", vs float64 SVD {math.sqrt(num_fast / den64):.1e} (worst matrix {worst:.1e}; "
               f"float32 SVD vs float64 SVD {math.sqrt(num_ref / den64):.1e})")
        tf, tr = statistics.median(fast_times), statistics.median(ref_times)
        pairs = " ".join(f"{a / b:.2f}" for a, b in zip(fast_times, ref_times))
        print(f"[{kind}] merge step t={args.step}: isotropic merger {tf:.2f} s (CPU {statistics.median(fast_cpu):.2f} s), "
              f"plain per-matrix float32 SVD {tr:.2f} s (CPU {statistics.median(ref_cpu):.2f} s) "
              f"(medians of {args.pairs} A/B pairs): ratio {tf / tr:.2f}x (pairs {pairs}; target <= 0.35x); "
              f"rel. error of Δ_merged vs float32 SVD {math.sqrt(num_fr / den):.1e}{f64} "
              f"[load average {os.getloadavg()[0]:.1f}]", flush=True)
        del fast, ref


if __name__ == "__main__":
    main()
