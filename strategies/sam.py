"""Sharpness-aware fine-tuning learners (the SAFT seed): SAM (Foret et al., 2021) and ASAM
(Kwon et al., 2021), both with AdamW as the base optimizer, like the ``adam`` learner.

One step, two gradient evaluations (the learner's closure is called twice):

    g  = ∇L(θ)
    ε  = ρ g / ‖g‖₂                                  (SAM)
    ε  = ρ T² g / ‖T g‖₂,  T = diag(|θ| + η)         (ASAM, element-wise adaptive sharpness)
    g′ = ∇L(θ + ε);  θ restored exactly;  AdamW step with g′ (moments, decoupled decay 0.01 on all
    parameters, cosine schedule — the base optimizer is unchanged)

Norms run over all trainable parameters together. ASAM follows Kwon et al.'s definition and their
reference code: T scales weights only; biases get T = 1 (η = 0.01, ρ = 0.5 by default, the values
the SAFT paper keeps). Biases are recognised by name (the last name component contains ``bias``:
``bias``, ``in_proj_bias``); everything else, including open_clip's ``class_embedding``,
``positional_embedding`` and ``proj``, is a weight here — the reference code's test
(``"weight" in name``) would leave those three unscaled only because of how open_clip names them.

Where the SAFT seed's shorthand differs: it writes ε = ρ θ² ∇L / ‖∇L‖, i.e. without η (a zero
weight could then never be perturbed), with the unscaled gradient in the denominator (so the
perturbation does not have norm ρ in ASAM's adaptive metric, ‖T⁻¹ε‖ = ρ), and without the bias
exception. We implement ASAM's own form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch

from cl_merge.learner import FitContext, GradientLearner
from cl_merge.registry import register_learner


def is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


class SharpnessAware(torch.optim.Optimizer):
    """SAM/ASAM ascent step around a base optimizer that shares its ``param_groups`` (so the
    learner's LR scheduler drives both). ``adaptive=False`` → SAM, ``True`` → ASAM."""

    def __init__(self, params, base: Callable[..., torch.optim.Optimizer], rho: float, adaptive: bool = False,
                 eta: float = 0.01, **base_kwargs):
        if rho < 0.0 or eta < 0.0:
            raise ValueError(f"rho and eta must be >= 0; got rho={rho}, eta={eta}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        self.base_optimizer = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._unscaled: set = set()

    def set_unscaled(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Parameters that ASAM perturbs with T = 1 (biases)."""
        self._unscaled = {id(p) for p in params}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            raise RuntimeError("SAM/ASAM evaluate the gradient twice per step: pass the closure")
        with torch.enable_grad():
            loss = closure()  # g = ∇L(θ)
        params, scaled = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                st = self.state[p]
                if "backup" not in st:  # persistent buffers: fresh large tensors each step cost page faults
                    st["backup"] = torch.empty_like(p)
                if group["adaptive"] and id(p) not in self._unscaled:
                    if "scale" not in st:
                        st["scale"] = torch.empty_like(p)
                    scaled.append((p, torch.abs(p, out=st["scale"]).add_(group["eta"])))  # T = |θ| + η
        if not params:
            return loss
        # g is not needed once ε is known, so T g and then T² g are formed in place in p.grad
        for p, t in scaled:
            p.grad.mul_(t)
        grads = [p.grad for p in params]
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))  # ‖T g‖
        for p, t in scaled:
            p.grad.mul_(t)
        backups = [self.state[p]["backup"] for p in params]
        torch._foreach_copy_(backups, params)
        if norm > 0.0:
            torch._foreach_add_(params, grads, alpha=self.param_groups[0]["rho"] / norm)  # θ + ε
        del grads, scaled
        with torch.enable_grad():
            closure()  # g′ = ∇L(θ + ε)
        torch._foreach_copy_(params, backups)  # θ restored exactly
        self.base_optimizer.step()
        return loss


@dataclasses.dataclass
class _SharpnessAwareLearner(GradientLearner):
    rho: float = 0.05
    adaptive: bool = dataclasses.field(default=False, init=False, repr=False)
    eta: float = dataclasses.field(default=0.0, init=False, repr=False)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return SharpnessAware(params, torch.optim.AdamW, rho=self.rho, adaptive=self.adaptive, eta=self.eta,
                              lr=self.lr, weight_decay=self.weight_decay)

    def before_training_exp(self, ctx: FitContext) -> None:
        if isinstance(ctx.optimizer, SharpnessAware):
            ctx.optimizer.set_unscaled(p for n, p in ctx.params.items() if is_bias(n))


@register_learner
@dataclasses.dataclass
class SAMLearner(_SharpnessAwareLearner):
    """SAM (Foret et al.): ε = ρ g/‖g‖, ρ = 0.05; AdamW step with the gradient at θ + ε."""

    name = "sam"
    description = "SAM fine-tuning (AdamW base, ρ = 0.05)"
    rho: float = 0.05


@register_learner
@dataclasses.dataclass
class ASAMLearner(_SharpnessAwareLearner):
    """ASAM (Kwon et al.): ε = ρ T²g/‖Tg‖, T = |θ| + η on weights, 1 on biases; ρ = 0.5, η = 0.01."""

    name = "asam"
    description = "ASAM fine-tuning (SAFT's default; AdamW base, ρ = 0.5, η = 0.01)"
    rho: float = 0.5
    eta: float = 0.01
    adaptive: bool = dataclasses.field(default=True, init=False, repr=False)
