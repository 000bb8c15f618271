"""Step time of SA-BCD (and SAM/ASAM) divided by the AdamW step time, same model and batch, CPU.

Models: the mini suite's image tower (32×32 inputs) and open_clip's ViT-B/32 image tower
(``pretrained=None``, 224×224 inputs); weights do not matter for timing. Every optimizer step runs
the learner's own closure shape (zero_grad → loss → backward) through ``make_optimizer`` of the
registered learners. Steps of the optimizers are interleaved (round robin) so that load from other
processes hits all of them alike; the figures are medians.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/sa_bcd_step.py [--threads 2] [--steps 12]
        [--models mini,vit-b-32] [--vit-batch 4] [--mini-batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# OpenMP's own wait policy, as in a cl_merge run. On a machine shared with other jobs, spinning
# threads inflate wall times many-fold: run with OMP_WAIT_POLICY=PASSIVE there (printed below).
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cl_merge  # noqa: E402,F401  (torchvision shim before open_clip)
from cl_merge.registry import LEARNERS  # noqa: E402

LEARNER_NAMES = ("adam", "sa_bcd", "sa_bcd:literal", "sa_bcd:global", "sam", "asam")


def build(model_name: str, batch: int, gen: torch.Generator):
    import open_clip

    if model_name == "mini":
        from cl_merge.benchmarks.mini.pretrain import create_model

        visual, size = create_model().visual, 32
    else:
        visual, size = open_clip.create_model("ViT-B-32", pretrained=None).visual, 224
    visual.train()
    out_dim = visual.output_dim
    head = torch.randn(10, out_dim, generator=gen)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)

    def loss_fn():
        return F.cross_entropy(F.normalize(visual(images), dim=-1) @ head.T * 30.0, labels)

    return visual, loss_fn


def make(name: str, params):
    learner_name, _, variant = name.partition(":")
    kw = {}
    if variant == "literal":
        kw["update"] = "literal"
    elif variant == "global":
        kw["scope"] = "global"
    learner = LEARNERS.get(learner_name)(steps=100, batch_size=1, lr=1e-5, **kw)
    return learner.make_optimizer(params)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per optimizer (after 2 warm-up)")
    ap.add_argument("--models", default="mini,vit-b-32")
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--vit-batch", type=int, default=4)
    ap.add_argument("--learners", default=",".join(LEARNER_NAMES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.learners.split(",")
    for model_name in args.models.split(","):
        gen = torch.Generator().manual_seed(0)
        batch = args.mini_batch if model_name == "mini" else args.vit_batch
        model, loss_fn = build(model_name, batch, gen)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        optimizers = {n: make(n, params) for n in names}
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}
        passes = []
        for i in range(args.steps + 2):
            for n, opt in optimizers.items():
                with torch.no_grad():  # every optimizer steps from the same weights
                    for p, s in zip(params, start):
                        p.copy_(s)

                def closure(opt=opt):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn()
                    loss.backward()
                    return loss

                t0, c0 = time.perf_counter(), time.process_time()
                opt.step(closure)
                if i >= 2:
                    times[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
            t0 = time.perf_counter()
            closure()  # one forward/backward alone: the floor of any step
            if i >= 2:
                passes.append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in params)
        adam = statistics.median(times["adam"])
        adam_cpu = statistics.median(cpu["adam"])
        fb = statistics.median(passes)
        print(f"{model_name}: {n_params / 1e6:.2f}M parameters, batch {batch}, threads {args.threads}, "
              f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY {WAIT_POLICY}; median of {args.steps} steps; "
              f"one forward+backward {fb * 1e3:.1f} ms")
        print(f"  reference: adam (AdamW) wall {adam * 1e3:.1f} ms/step, CPU {adam_cpu * 1e3:.1f} ms/step; "
              f"load average now {os.getloadavg()[0]:.1f}")
        for n in names:
            med, med_cpu = statistics.median(times[n]), statistics.median(cpu[n])
            # each step's ratio against the adam step of the same round (the A B A B pairs)
            pairs = [a / b for a, b in zip(times[n], times["adam"])]
            print(f"  {n:15s} wall {med * 1e3:8.1f} ms/step  ÷ adam {med / adam:4.2f}× "
                  f"(median of {len(pairs)} paired ratios {statistics.median(pairs):4.2f}×, "
                  f"pairs {' '.join(f'{r:.2f}' for r in pairs)})   "
                  f"CPU {med_cpu * 1e3:8.1f} ms/step  ÷ adam {med_cpu / adam_cpu:4.2f}×")


if __name__ == "__main__":
    main()
