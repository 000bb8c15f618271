"""OPCM: orthogonal-projection continual merging (Tang et al. 2025; FusionBench ``OPCMForCLIP``).

    t = 1:  deployed_1 = expert_1,  λ_1 = 1
    t > 1:  per 2-D weight, U S Vᵀ = SVD(M_{t−1}) (M_{t−1} = previous − θ0),
            r = first index with cumsum(S)/ΣS > α   (α = 0.5),
            P = Uᵀ τ_t V;  zero P's diagonal and its top-left r×r block;  τ̃ = U P Vᵀ
            non-2-D parameters: τ̃ = τ_t
            S_t = λ_{t−1} M_{t−1} + τ̃
            λ_t = ‖S_t‖ / mean_{i≤t} ‖τ_i‖          (norms over all merged parameters together)
            deployed_t = θ0 + S_t / λ_t

Rule table (``cl_merge.tensor_kinds`` decides each tensor's kind):

===============  ========================================  =====================  =========================
kind             open_clip image tower                     ``preset="default"``   ``"fusionbench"``
===============  ========================================  =====================  =========================
qkv              ``attn.in_proj_weight`` (3d × d)           projected per q, k, v  projected per q, k, v
matrix           ``out_proj``, ``c_fc``, ``c_proj``,        projected              projected
                 ``proj``
positional       ``positional_embedding``                   τ̃ = τ (summed)         τ̃ = τ (summed)
conv             ``conv1.weight``                           τ̃ = τ                  τ̃ = τ
embedding        ``class_embedding``                        τ̃ = τ                  frozen: S_t = M_{t−1}
bias, norm       ``*.bias``, ``in_proj_bias``, ``ln_*``     τ̃ = τ                  τ̃ = τ
===============  ========================================  =====================  =========================

``"fusionbench"`` is FusionBench's ``OPCMForCLIP`` on a Hugging Face ``CLIPVisionModel`` (as
converted by ``benchmarks/vision20/convert_hf_clip.py``): it projects the weights of ``nn.Linear``
leaf modules (q, k, v, out_proj, fc1, fc2; the visual projection of ``…WithProjection``), merges
the parameters of every other leaf module (Conv2d patch embedding, Embedding position table,
LayerNorms, biases) as τ̃ = τ, and never visits parameters held by a non-leaf module: the class
embedding keeps the first expert's value, only rescaled by 1/λ_t with everything else (so
S_t = M_{t−1} there, and M_{t−1} — not λ_{t−1} M_{t−1} — enters ‖S_t‖). ``"default"`` differs in
that one row only (the class token is merged like a bias: a parameter is not skipped for where
it is stored). ``qkv="stacked"`` projects open_clip's 3d × d matrix in one piece (neither
reference does). Measured on mini (order 1, seed 0, ACC / BWT in %): default 68.9 / −5.3,
``"fusionbench"`` 68.8 / −5.4, ``qkv="stacked"`` 69.0 / −6.2 (the earlier rule, which also projected
the positional embedding: 69.0 / −6.2).

Rank split: r is a 0-based index, exactly FusionBench's ``(cumsum/sum > α).argmax()``: the block covers
the r leading components whose cumulative share is ≤ α, the crossing component stays outside it (its
diagonal entry is still zeroed), and r = 0 when σ_1 alone exceeds α of the total.

Exact shortcut: only P's k×k leading block (k = min(m, n)) is ever zeroed, so with the thin SVD
(U_k, S, V_k)
    τ̃ = τ − U_k Q V_kᵀ,  Q = diag(d) with Q[:r, :r] = U_rᵀ τ V_r,  d_i = u_iᵀ τ v_i,
which equals the full-SVD formula without forming the m×m / n×n bases (U_⊥, V_⊥ only multiply blocks
that are kept). Wide matrices are transposed first (the rule is symmetric under it), so m ≥ n = k.

No SVD is computed: V and S² come from the eigendecomposition of the n×n Gram matrix G = MᵀM (sorted
descending), and U = M V S⁻¹ (on the non-null directions). With K = Uᵀ τ V (K_ij = u_iᵀ τ v_j),
    τ̃ = τ − U Q Vᵀ,  Q = diag(K_ii) with Q[:r, :r] = K[:r, :r],
i.e. four m×n×n products (G, U, Uᵀτ and (UQ)Vᵀ), one n×n eigh and one n×n product.

Precision. G and its eigendecomposition are always float64: OPCM needs every singular pair on its own
(P's diagonal), and a float32 eigh rotates pairs with close singular values (error ~ε32·λ_max/gap, not
bounded by κ), up to 1.2e-5 relative on the ViT-B/32 benchmark's random MLP weights. U = M V S⁻¹ uses
the conditioning rule of ``cl_merge.numerics`` (``FAST_PATH_BOUND``), read off the float64
eigenvalues: float32 when ε32·κ² ≤ 1e-5 (well-conditioned rectangular matrices, κ ≈ 3–4), float64
otherwise (a float32 U would be off by ~ε32·κ on the small directions). The projection itself
(Uᵀτ V and U Q Vᵀ) runs in float32 always: U and V have orthonormal columns, so its rounding is
~ε32·‖τ‖ whatever κ is (measured on fine-tuning-like 768×768 / 3072×768 updates with κ up to 1e5:
2e-7 relative against a float64 full-SVD literal step, where the float32 literal step is at 5e-6 to
1.7e-5). An earlier form, τ̃ = τ − M (V X Vᵀ) with X = S⁻¹Q S⁻¹, needed every product in float64
on ill-conditioned M, since the operator V X Vᵀ carries 1/σ².
Timings and errors: ``benchmarks/perf/opcm_step.py``.

Null directions. Singular directions with σ_i ≤ 10·ε32·σ_max (the deltas are float32 data; this is
also far above the float64 Gram matrix's noise floor, σ ≈ √ε64·σ_max) carry no signal: their singular
vectors are arbitrary, and a literal SVD would zero P's diagonal along whatever basis LAPACK returns
there. They contribute nothing here: τ̃ − τ stays inside M's row and column spaces. The rank split r
still uses all n singular values (the null ones as 0). On full-rank matrices this is exactly the
formula above.

When M_{t−1} of a weight is exactly zero there is no previous subspace and τ̃ = τ_t (FusionBench's
result there would depend on the arbitrary basis LAPACK returns for a zero matrix).

State: λ_{t−1}, the running sum of task-vector norms and their count (three scalars).

Streaming: the per-tensor rule produces S_t; ‖τ_t‖² and ‖S_t‖² are accumulated while it runs
(``plan``), λ_t is set in ``after_pass`` and deployed = θ0 + S_t/λ_t is a finalizing pass over the
spooled S_t. One executor runs this over either parameter store.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Literal, Optional

import torch

from cl_merge.merge_engine import MergePlan
from cl_merge.merger import Merger
from cl_merge.numerics import float32_suffices, null_tolerance
from cl_merge.reductions import Total
from cl_merge.registry import register_merger
from cl_merge.tensor_kinds import Kind, RuleTable, map_blocks, rule_for

#: rule tables (module doc). Rules: "project", "project_blocks" (each of q, k, v), "sum" (τ̃ = τ),
#: "frozen" (not merged, only rescaled: FusionBench's non-leaf parameters)
PRESETS: Dict[str, Dict[Kind, str]] = {
    "default": {Kind.QKV: "project_blocks", Kind.MATRIX: "project", Kind.POSITIONAL: "sum",
                Kind.CONV: "sum", Kind.EMBEDDING: "sum", Kind.NORM: "sum", Kind.BIAS: "sum", Kind.OTHER: "sum"},
    "fusionbench": {Kind.QKV: "project_blocks", Kind.MATRIX: "project", Kind.POSITIONAL: "sum",
                    Kind.CONV: "sum", Kind.EMBEDDING: "frozen", Kind.NORM: "sum", Kind.BIAS: "sum",
                    Kind.OTHER: "sum"},
}


def rule_table(preset: str = "default", qkv: Optional[str] = None) -> Dict[Kind, str]:
    if preset not in PRESETS:
        raise ValueError(f"unknown opcm preset {preset!r}; choose one of {', '.join(PRESETS)}")
    table = dict(PRESETS[preset])
    if qkv is not None:
        table[Kind.QKV] = {"split": "project_blocks", "stacked": "project"}[qkv]
    return table

#: singular directions of M_{t−1} with σ_i ≤ NULL_RTOL·σ_max are null (module doc)
NULL_RTOL = null_tolerance(torch.float32)


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """First 0-based index where the cumulative singular-value share exceeds α (0 if none does)."""
    return int((s.cumsum(0) / s.sum() > alpha).to(torch.int8).argmax())


def gram_eigh(a: torch.Tensor):
    """Eigendecomposition of the Gram matrix aᵀa of a tall matrix ``a`` (float64) and the working
    precision of the products (module doc). Returns ``(a, lam, vec)``: ``a`` in the working dtype, the
    eigenvalues σ_i² (float64, ≥ 0) in descending order and the eigenvectors in the working dtype."""
    a64 = a.double()
    lam, vec = torch.linalg.eigh(a64.T @ a64)
    lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
    if a.dtype != torch.float64 and lam[-1] > 0 and float32_suffices(float(lam[0] / lam[-1])):
        return a.float(), lam, vec.float()
    return a64, lam, vec


def project_task_vector(prev_delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ̃ for one 2-D weight (see the module docstring): Gram/eigh route; U = M V S⁻¹ in the working
    precision, the projection itself with the orthonormal factors in float32."""
    m = prev_delta if prev_delta.dtype == torch.float64 else prev_delta.float()
    if not bool(m.any()):
        return tau.clone()
    transposed = m.shape[0] < m.shape[1]
    a, lam, vec = gram_eigh(m.T if transposed else m)
    s = lam.sqrt()
    keep = int((s > NULL_RTOL * s[0]).sum())                 # a prefix: s is descending
    r = min(split_rank(torch.cat([s[:keep], s.new_zeros(s.numel() - keep)]), alpha), keep)
    vk = vec[:, :keep]
    u = (a @ vk) / s[:keep].to(a.dtype)                      # U = M V S⁻¹ (float64 when κ demands it)
    work = torch.float64 if tau.dtype == torch.float64 else torch.float32
    u, vk = u.to(work), vk.to(work)
    x = (tau.T if transposed else tau).to(work)
    k = (u.T @ x) @ vk                                       # K = Uᵀ τ V (orthonormal factors)
    q = torch.diag_embed(k.diagonal())                       # Q: P's diagonal …
    if r > 0:
        q[:r, :r] = k[:r, :r]                                # … and its r×r leading block
    out = x - (u @ q) @ vk.T                                 # τ − U Q Vᵀ
    if transposed:
        out = out.T
    return out.to(tau.dtype).contiguous()


def merged_tensor(name: str, prev_delta: torch.Tensor, tau: torch.Tensor, lam_prev: float, alpha: float,
                  table: RuleTable) -> torch.Tensor:
    """S_t of one tensor (float32 inputs): λ_{t−1} M_{t−1} + τ̃ under the tensor's rule."""
    rule = rule_for(name, prev_delta, table)
    if rule == "frozen":
        return prev_delta.clone()
    if rule == "project":
        projected = project_task_vector(prev_delta, tau, alpha)
    elif rule == "project_blocks":
        projected = map_blocks(lambda m, t: project_task_vector(m, t, alpha), prev_delta, tau)
    elif rule == "sum":
        projected = tau
    else:
        raise ValueError(f"unknown opcm rule {rule!r}")
    return lam_prev * prev_delta + projected


@register_merger
@dataclasses.dataclass
class OPCMMerger(Merger):
    """OPCM (module doc); ``preset`` and ``qkv`` choose the rule table."""

    name = "opcm"
    description = "orthogonal-projection continual merging with norm rescaling (α = 0.5 rank split)"
    alpha: float = 0.5
    preset: Literal["default", "fusionbench"] = "default"
    qkv: Optional[Literal["split", "stacked"]] = None

    def __post_init__(self):
        self.rules = rule_table(self.preset, self.qkv)

    def reset_state(self):
        self._lambda = 1.0
        self._norm_sum = 0.0
        self._count = 0

    def plan(self, step, context):
        # norms over all merged parameters together (float64 accumulation, in name order)
        norms = [Total("tau_sq", lambda x, y: float(x.tau.double().pow(2).sum()))]
        if step == 1:
            return MergePlan(accumulators=norms)
        norms.append(Total("s_sq", lambda x, y: float(y.double().pow(2).sum())))
        return MergePlan(accumulators=norms, finalize=True)

    def merge_tensor(self, x):
        if x.step == 1:
            return x.expert.detach().clone()
        b = x.base
        prev_delta = x.previous.float() - b.float()
        return merged_tensor(x.name, prev_delta, x.tau.float(), self._lambda, self.alpha, self.rules)  # S_t

    def after_pass(self, view):
        self._norm_sum += view.totals["tau_sq"] ** 0.5
        self._count += 1
        if view.inputs.step == 1:
            self._lambda = 1.0
            return
        mean_norm = self._norm_sum / self._count
        merged_norm = view.totals["s_sq"] ** 0.5
        # S_t = 0 only when every task vector so far is 0; any λ then deploys θ0
        self._lambda = merged_norm / mean_norm if merged_norm > 0 else 1.0

    def finalize_tensor(self, x, merged):
        return (x.base.float() + merged / self._lambda).to(x.base.dtype)

    def scalar_state(self):
        return {"lambda": torch.tensor(self._lambda, dtype=torch.float64),
                "norm_sum": torch.tensor(self._norm_sum, dtype=torch.float64),
                "count": torch.tensor(self._count, dtype=torch.int64)}

    def load_scalar_state(self, state):
        self._lambda = float(state["lambda"])
        self._norm_sum = float(state["norm_sum"])
        self._count = int(state["count"])
