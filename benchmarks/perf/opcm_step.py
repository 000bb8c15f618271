"""OPCM merge step on the ViT-B/32 image tower (random weights, CPU): time and exactness.

Times ``OPCMMerger.merge`` at step t = 2 (the first step with projections) against a literal
implementation of the definition, the way FusionBench's general OPCM computes it: full SVD
(full_matrices=True) of M_{t−1}, P = Uᵀ τ V with the m×m and n×n bases, zero diagonal and r×r block,
τ̃ = U P Vᵀ, on the merger's rule table (q, k, v projected one by one, as on HF CLIP). The two
alternate A B A B (``--pairs``); the ratio is median / median, the pairs are printed. Error: the
deployed update against the literal one, and on block 0 both against the literal step in float64. Two kinds of task vectors: i.i.d. Gaussian and "fine-tuning-like" (a few strong
directions with a decaying spectrum plus small noise).

Wall time depends on what else runs on the machine; with ``--threads 1`` the CPU time of the step is
an upper bound of its wall time on an otherwise idle machine (a second thread never makes it slower),
and it is far less sensitive to other processes. The load average is printed with the figures.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/opcm_step.py [--threads 2] [--pairs 3] [--kinds finetune]
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

import cl_merge  # noqa: F401,E402  (torchvision shim before open_clip)
from vit_weights import task_vector, vit_b32_tower  # noqa: E402
from cl_merge.params import global_norm, is_matrix  # noqa: E402
from cl_merge.strategies.opcm import OPCMMerger  # noqa: E402
from cl_merge.tensor_kinds import map_blocks, rule_for  # noqa: E402


def _literal_project(m, tau, alpha):
    """FusionBench's general OPCM on one matrix: full SVD, P = Uᵀ τ V, zero diagonal and r×r block."""
    u, s, vh = torch.linalg.svd(m, full_matrices=True)
    r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ tau @ vh.T
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    return u @ p @ vh


def literal_opcm_step(base, previous, expert, lam_prev, mean_norm, rules, alpha=0.5, names=None):
    """Step t ≥ 2 of OPCM written directly from the definition with full SVDs (the reference), on the
    merger's rule table (projected: ``project`` and, per q/k/v block, ``project_blocks``; τ̃ = τ
    elsewhere), so both compute the same formula. ``names``: only these tensors (λ then from them)."""
    merged = {}
    for k in names or base:
        m = previous[k] - base[k]
        tau = expert[k] - base[k]
        rule = rule_for(k, m, rules)
        if rule == "project":
            tau = _literal_project(m, tau, alpha)
        elif rule == "project_blocks":
            tau = map_blocks(lambda mb, tb: _literal_project(mb, tb, alpha), m, tau)
        merged[k] = lam_prev * m + tau
    lam = global_norm(merged) / mean_norm
    return {k: base[k] + merged[k] / lam for k in merged}


def rel_error(fast, ref, base, names):
    num = den = 0.0
    for k in names:
        a, b = (fast[k] - base[k]).double(), (ref[k] - base[k]).double()
        num += float((a - b).norm()) ** 2
        den += float(b.norm()) ** 2
    return math.sqrt(num / den)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="alternating merger/reference pairs (>= 3)")
    ap.add_argument("--kinds", default="gaussian,finetune")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 check")
    args = ap.parse_args()
    if args.pairs < 3:
        ap.error("--pairs must be >= 3 (median of at least 3 alternating pairs)")
    torch.set_num_threads(args.threads)
    base = vit_b32_tower()
    mats = [k for k, v in base.items() if is_matrix(v)]
    print(f"ViT-B/32 image tower: {sum(v.numel() for v in base.values()) / 1e6:.1f}M parameters, "
          f"{len(mats)} 2-D tensors; threads={args.threads}, load average {os.getloadavg()[0]:.1f}, "
          f"OMP_WAIT_POLICY {WAIT_POLICY}", flush=True)
    for kind in args.kinds.split(","):
        gen = torch.Generator().manual_seed(0)
        e1 = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        e2 = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        merger = OPCMMerger()
        merger.reset(base)
        d1 = merger.merge(base=base, previous=base, expert=e1, start=base, step=1)
        after_step1 = {k: v.clone() for k, v in merger.state_dict().items()}
        mean_norm = (global_norm({k: e1[k] - base[k] for k in base})
                     + global_norm({k: e2[k] - base[k] for k in base})) / 2
        fast_t, ref_t = [], []
        for _ in range(args.pairs):  # A B A B …
            merger.load_state_dict(after_step1)
            t0 = time.perf_counter()
            fast = merger.merge(base=base, previous=d1, expert=e2, start=base, step=2)
            fast_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = literal_opcm_step(base, d1, e2, 1.0, mean_norm, merger.rules)
            ref_t.append(time.perf_counter() - t0)
        tf, tr = statistics.median(fast_t), statistics.median(ref_t)
        pairs = " ".join(f"{a / b:.2f}" for a, b in zip(fast_t, ref_t))
        line = (f"[{kind}] OPCM step t=2: merger {tf:.2f} s, FusionBench-style literal full-SVD step {tr:.2f} s "
                f"(medians of {args.pairs} A/B pairs): ratio {tf / tr:.2f}x (pairs {pairs}; target <= 0.35x); "
                f"rel. difference of the deployed update {rel_error(fast, ref, base, base):.1e}")
        if not args.no_f64:
            # float64 reference on one block's tensors (λ from them alone, as both sides here)
            names = [k for k in base if k.startswith("transformer.resblocks.0.")]
            dbl = lambda st: {k: st[k].double() for k in names}  # noqa: E731
            ref64 = literal_opcm_step(dbl(base), dbl(d1), dbl(e2), 1.0, mean_norm, merger.rules, names=names)
            sub = literal_opcm_step(base, d1, e2, 1.0, mean_norm, merger.rules, names=names)
            scale = {k: (fast[k] - base[k]) for k in names}
            # the merger's S_t on these tensors, rescaled by the same λ as the float64 reference
            lam_f = global_norm({k: scale[k] * merger._lambda for k in names}) / mean_norm
            fast_sub = {k: base[k] + scale[k] * merger._lambda / lam_f for k in names}
            line += (f"; vs float64 (block 0): merger {rel_error(fast_sub, ref64, dbl(base), names):.1e}, "
                     f"float32 literal {rel_error(sub, ref64, dbl(base), names):.1e}")
        print(line + f" [load average {os.getloadavg()[0]:.1f}]", flush=True)


if __name__ == "__main__":
    main()
