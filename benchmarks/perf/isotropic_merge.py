"""Adaptive isotropic merge on the ViT-B/32 image tower: time of one merge step and its error.

Compares the merger (Gram/eigh route, float64, same-shape batching) with a plain per-matrix SVD
implementation of Eq. 11 (torch.linalg.svd on each 2-D matrix, float32), on random weights.
Two kinds of task vectors: i.i.d. Gaussian (well-conditioned rectangular, ill-conditioned square
matrices) and "fine-tuning-like" ones (a decaying spectrum: a few strong directions plus noise).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/isotropic_merge.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time

# OpenMP's own wait policy, as in a cl_merge run. On a machine shared with other jobs, spinning
# threads inflate wall times many-fold: run with OMP_WAIT_POLICY=PASSIVE there (printed below).
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")

import torch  # noqa: E402

import cl_merge  # noqa: E402,F401  (torchvision shim before open_clip)
from vit_weights import task_vector, vit_b32_tower  # noqa: E402
from cl_merge.params import is_matrix  # noqa: E402
from cl_merge.strategies.isotropic import IsotropicMerger  # noqa: E402


def plain_svd_merge(base, previous, expert, start, step, lam=0.0, alpha=1.0):
    """Eq. 10–12 written directly with one SVD per 2-D matrix (the reference)."""
    out = {}
    for k in base:
        d = (1 + lam) * (previous[k] - base[k]) + (1 - lam) * (expert[k] - start[k])
        if is_matrix(d):
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            s_bar = s.mean()
            d = (u * (s_bar + (s - s_bar) / math.sqrt(step))) @ vh
        out[k] = base[k] + alpha * d
    return out



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--step", type=int, default=3, help="t of the merge step (t = 1 needs no SVD)")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 SVD check (~1 s per matrix)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = vit_b32_tower()
    mats = [k for k, v in base.items() if is_matrix(v)]
    print(f"ViT-B/32 image tower: {sum(v.numel() for v in base.values()) / 1e6:.1f}M parameters, "
          f"{len(mats)} 2-D matrices; threads={args.threads}, load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY {WAIT_POLICY}")
    merger = IsotropicMerger()
    merger.reset(base)
    for kind in ("gaussian", "finetune"):
        gen = torch.Generator().manual_seed(0)
        previous = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        expert = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        fast_times, ref_times, fast_cpu, ref_cpu = [], [], [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fast = merger.merge(base=base, previous=previous, expert=expert, start=base, step=args.step)
            fast_times.append(time.perf_counter() - t0)
            fast_cpu.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            ref = plain_svd_merge(base, previous, expert, base, args.step)
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
            # Δ_com rounded to float32 exactly as both implementations form it: the methods' own error
            com = ((previous[k] - base[k]) + (expert[k] - base[k])).double()
            u, s, vh = torch.linalg.svd(com, full_matrices=False)
            d64 = (u * (s.mean() + (s - s.mean()) / math.sqrt(args.step))) @ vh
            e = float((d_fast - d64).norm())
            worst = max(worst, e / float(d64.norm()))
            num_fast += e ** 2
            num_ref += float((d_ref - d64).norm()) ** 2
            den64 += float(d64.norm()) ** 2
        f64 = ("" if args.no_f64 else
               f", vs float64 SVD {math.sqrt(num_fast / den64):.1e} (worst matrix {worst:.1e}; "
               f"float32 SVD vs float64 SVD {math.sqrt(num_ref / den64):.1e})")
        print(f"[{kind}] merge step t={args.step}: isotropic merger {min(fast_times):.2f} s "
              f"(CPU {min(fast_cpu):.2f} s), plain per-matrix SVD {min(ref_times):.2f} s "
              f"(CPU {min(ref_cpu):.2f} s) (best of {args.repeats}, load average {os.getloadavg()[0]:.1f}); "
              f"rel. error of Δ_merged vs float32 SVD {math.sqrt(num_fr / den):.1e}{f64}", flush=True)
        del fast, ref


if __name__ == "__main__":
    main()
