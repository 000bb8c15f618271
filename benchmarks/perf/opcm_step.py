"""OPCM merge step on the ViT-B/32 image tower (random weights, CPU): time and exactness.

Times ``OPCMMerger.merge`` at step t = 2 (the first step with projections) and compares it with a
literal implementation of the definition, the way FusionBench computes it: full SVD
(full_matrices=True) of M_{t−1}, P = Uᵀ τ V with the m×m and n×n bases, zero diagonal and r×r block,
τ̃ = U P Vᵀ. Two kinds of task vectors: i.i.d. Gaussian and "fine-tuning-like" (a few strong
directions with a decaying spectrum plus small noise).

Wall time depends on what else runs on the machine; with ``--threads 1`` the CPU time of the step is
an upper bound of its wall time on an otherwise idle machine (a second thread never makes it slower),
and it is far less sensitive to other processes. The load average is printed with the figures.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/opcm_step.py [--threads 2] [--repeats 3] [--no-reference]
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

import cl_merge  # noqa: F401,E402  (torchvision shim before open_clip)
from vit_weights import task_vector, vit_b32_tower  # noqa: E402
from cl_merge.params import global_norm, is_matrix  # noqa: E402
from cl_merge.strategies.opcm import OPCMMerger  # noqa: E402


def literal_opcm_step(base, previous, expert, lam_prev, mean_norm, alpha=0.5):
    """Step t ≥ 2 of OPCM written directly from the definition with full SVDs (the reference)."""
    merged = {}
    for k in base:
        m = previous[k] - base[k]
        tau = expert[k] - base[k]
        if is_matrix(m):
            u, s, vh = torch.linalg.svd(m, full_matrices=True)
            r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
            p = u.T @ tau @ vh.T
            p.diagonal().fill_(0)
            p[:r, :r] = 0
            tau = u @ p @ vh
        merged[k] = lam_prev * m + tau
    lam = global_norm(merged) / mean_norm
    return {k: base[k] + merged[k] / lam for k in base}



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="skip the full-SVD reference (~20 s)")
    ap.add_argument("--kinds", default="gaussian,finetune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = vit_b32_tower()
    mats = [k for k, v in base.items() if is_matrix(v)]
    print(f"ViT-B/32 image tower: {sum(v.numel() for v in base.values()) / 1e6:.1f}M parameters, "
          f"{len(mats)} 2-D matrices projected (incl. positional_embedding, proj, in_proj_weight); "
          f"threads={args.threads}, load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY {WAIT_POLICY}", flush=True)
    for kind in args.kinds.split(","):
        gen = torch.Generator().manual_seed(0)
        e1 = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        e2 = {k: base[k] + d for k, d in task_vector(base, kind, gen).items()}
        merger = OPCMMerger()
        merger.reset(base)
        d1 = merger.merge(base=base, previous=base, expert=e1, start=base, step=1)
        after_step1 = {k: v.clone() for k, v in merger.state_dict().items()}
        times, cpu = [], []
        for _ in range(args.repeats):
            merger.load_state_dict(after_step1)
            t0, c0 = time.perf_counter(), time.process_time()
            fast = merger.merge(base=base, previous=d1, expert=e2, start=base, step=2)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        line = (f"[{kind}] OPCM merge step t=2: wall {min(times):.2f} s best of {args.repeats} "
                f"(CPU {min(cpu):.2f} s)")
        if not args.no_reference:
            mean_norm = (global_norm({k: e1[k] - base[k] for k in base})
                         + global_norm({k: e2[k] - base[k] for k in base})) / 2
            t0, c0 = time.perf_counter(), time.process_time()
            ref = literal_opcm_step(base, d1, e2, 1.0, mean_norm)
            ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
            num = den = 0.0
            for k in base:
                a, b = (fast[k] - base[k]).double(), (ref[k] - base[k]).double()
                num += float((a - b).norm()) ** 2
                den += float(b.norm()) ** 2
            line += (f"; literal full-SVD step wall {ref_s:.2f} s (CPU {ref_cpu:.2f} s); "
                     f"rel. difference of the deployed update "
                     f"{math.sqrt(num / den):.1e}")
        print(line + f" [load average {os.getloadavg()[0]:.1f}]", flush=True)


if __name__ == "__main__":
    main()
