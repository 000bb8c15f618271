"""OPCM: orthogonal-projection continual merging (Tang et al. 2025; FusionBench ``OPCMForCLIP``).

    t = 1:  deployed_1 = expert_1,  λ_1 = 1
    t > 1:  per 2-D weight, U S Vᵀ = SVD(M_{t−1}) (M_{t−1} = previous − θ0),
            r = first index with cumsum(S)/ΣS > α   (α = 0.5),
            P = Uᵀ τ_t V;  zero P's diagonal and its top-left r×r block;  τ̃ = U P Vᵀ
            non-2-D parameters: τ̃ = τ_t
            S_t = λ_{t−1} M_{t−1} + τ̃
            λ_t = ‖S_t‖ / mean_{i≤t} ‖τ_i‖          (norms over all merged parameters together)
            deployed_t = θ0 + S_t / λ_t

"2-D" is every matrix parameter of the merged tower (``params.is_matrix``), so for open_clip's visual
tower that includes ``attn.in_proj_weight``, ``proj`` and ``positional_embedding``; FusionBench only
projects ``nn.Linear`` weights and skips parameters held directly by non-leaf modules. conv1 (4-D) is
summed like a bias.

Rank split: r is a 0-based index, exactly FusionBench's ``(cumsum/sum > α).argmax()``: the block covers
the r leading components whose cumulative share is ≤ α, the crossing component stays outside it (its
diagonal entry is still zeroed), and r = 0 when σ_1 alone exceeds α of the total.

Exact shortcut: only P's k×k leading block (k = min(m, n)) is ever zeroed, so with the thin SVD
(U_k, S, V_k)
    τ̃ = τ − U_k Q V_kᵀ,  Q = diag(d) with Q[:r, :r] = U_rᵀ τ V_r,  d_i = u_iᵀ τ v_i,
which equals the full-SVD formula without forming the m×m / n×n bases (U_⊥, V_⊥ only multiply blocks
that are kept). Wide matrices are transposed first (cheaper SVD; the rule is symmetric under it).

When M_{t−1} of a weight is exactly zero there is no previous subspace and τ̃ = τ_t (FusionBench's
result there would depend on the arbitrary basis LAPACK returns for a zero matrix).

State: λ_{t−1}, the running sum of task-vector norms and their count (three scalars).
"""

from __future__ import annotations

import dataclasses

import torch

from cl_merge.merger import Merger
from cl_merge.params import clone, global_norm, is_matrix, sub
from cl_merge.registry import register_merger


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """First 0-based index where the cumulative singular-value share exceeds α (0 if none does)."""
    return int((s.cumsum(0) / s.sum() > alpha).to(torch.int8).argmax())


def project_task_vector(prev_delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ̃ for one 2-D weight (see the module docstring), computed in float32."""
    m, x = prev_delta.float(), tau.float()
    if not bool(m.any()):
        return tau.clone()
    transposed = m.shape[0] < m.shape[1]
    if transposed:
        m, x = m.T, x.T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = split_rank(s, alpha)
    w = u.T @ x                       # rows: u_iᵀ τ
    d = (w * vh).sum(1)               # d_i = u_iᵀ τ v_i
    uq = u * d                        # U diag(d)
    if r > 0:
        uq[:, :r] = u[:, :r] @ (w[:r] @ vh[:r].T)   # the whole top-left r×r block
    out = x - uq @ vh
    if transposed:
        out = out.T
    return out.to(tau.dtype).contiguous()


@register_merger
@dataclasses.dataclass
class OPCMMerger(Merger):
    name = "opcm"
    description = "orthogonal-projection continual merging with norm rescaling (α = 0.5 rank split)"
    alpha: float = 0.5

    def reset(self, base):
        self._lambda = 1.0
        self._norm_sum = 0.0
        self._count = 0

    def merge(self, base, previous, expert, start, step):
        tau = sub(expert, start)
        self._norm_sum += global_norm(tau)
        self._count += 1
        if step == 1:
            self._lambda = 1.0
            return clone(expert)
        mean_norm = self._norm_sum / self._count
        merged = {}
        for n, b in base.items():
            prev_delta = previous[n].float() - b.float()
            t_n = tau[n].float()
            projected = project_task_vector(prev_delta, t_n, self.alpha) if is_matrix(b) else t_n
            merged[n] = self._lambda * prev_delta + projected
        merged_norm = global_norm(merged)
        # S_t = 0 only when every task vector so far is 0; any λ then deploys θ0
        lam = merged_norm / mean_norm if merged_norm > 0 else 1.0
        self._lambda = lam
        return {n: (base[n].float() + merged[n] / lam).to(base[n].dtype) for n in base}

    def state_dict(self):
        return {"lambda": torch.tensor(self._lambda, dtype=torch.float64),
                "norm_sum": torch.tensor(self._norm_sum, dtype=torch.float64),
                "count": torch.tensor(self._count, dtype=torch.int64)}

    def load_state_dict(self, state):
        self._lambda = float(state["lambda"])
        self._norm_sum = float(state["norm_sum"])
        self._count = int(state["count"])
