"""The named strategies: (learner, merger, default protocol, hyperparameters), paper defaults."""

from cl_merge.registry import register_strategy

register_strategy("c-ft", "adam", "identity", "sequential",
                  description="continual fine-tuning: sequential Adam, no merging (lower bound)")
register_strategy("c-ta", "adam", "task_arithmetic", "independent", {"merger.alpha": 0.3},
                  description="continual task arithmetic, α = 0.3")
register_strategy("swa", "adam", "swa", "independent",
                  description="running average of independently fine-tuned experts")
register_strategy("c-ties", "adam", "ties", "independent",
                  {"merger.variant": "seed", "merger.k": 0.2, "merger.alpha": 0.3},
                  description="continual TIES (SAIM C.3): θ0 + α·Σ Trim_20%(τ_s), α = 0.3")
register_strategy("c-ties-fb", "adam", "ties", "independent",
                  {"merger.variant": "fusionbench", "merger.k": 0.2, "merger.alpha": 0.5},
                  description="FusionBench's continual TIES: previous + 0.5·TIES([M_{t−1}, τ_t])")
register_strategy("magmax", "adam", "magmax", "independent", {"merger.alpha": 0.5},
                  description="MagMax-IND: θ0 + 0.5·running max-magnitude task vector")
register_strategy("opcm", "adam", "opcm", "independent", {"merger.alpha": 0.5},
                  description="orthogonal-projection continual merging (Tang et al. 2025), α = 0.5")
register_strategy("ewc", "ewc", "identity", "sequential",
                  description="EWC through Avalanche's EWCPlugin: sequential AdamW + λ·Fisher penalty")
register_strategy("er", "er", "identity", "sequential",
                  description="experience replay through Avalanche's ReplayPlugin: 200-sample buffer, μ = 0.5")
register_strategy("saim", "sa_bcd", "isotropic", "independent",
                  {"learner.rho": 0.05, "learner.p": 0.3, "merger.lam": 0.0, "merger.alpha": 1.0},
                  description="SAIM: SA-BCD experts (ρ = 0.05, p = 0.3) + adaptive isotropic merge (λ = 0, α = 1)")

# multi-task merging: every expert trained independently from θ0, all merged in one call (docs/multitask-merging.md)
register_strategy("ta", "adam", "task_arithmetic", "multitask", {"merger.alpha": 0.3},
                  description="task arithmetic, all experts at once: θ0 + 0.3·Σ τ_t")
register_strategy("ties-m", "adam", "dare", "multitask",
                  {"merger.drop_rate": 0.0, "merger.combine": "ties", "merger.alpha": 0.3, "merger.k": 0.2},
                  description="TIES-merging all at once (DARE with p = 0): trim 20%, elect sign, disjoint sum, α = 0.3")
register_strategy("iso-c", "adam", "iso_c", "multitask", {"merger.alpha": 1.0},
                  description="ISO-C: α·σ̄·UVᵀ of Σ τ_t per matrix (q/k/v split), α = 1")
register_strategy("iso-cts", "adam", "iso_cts", "multitask", {"merger.alpha": 1.0, "merger.common_space_fraction": 0.8},
                  description="ISO-CTS: common (80%) + per-task subspaces, isotropic, α = 1")
register_strategy("tsv-m", "adam", "tsv_m", "multitask", {"merger.alpha": 1.0},
                  description="TSV-M: per-task rank-r/T SVD factors, Procrustes-whitened, α = 1")
register_strategy("fisher", "adam", "fisher", "multitask",
                  description="Fisher-weighted averaging (empirical Fisher on 0.5% / ≥ 256 training samples)")
register_strategy("dare-ta", "adam", "dare", "multitask",
                  {"merger.drop_rate": 0.5, "merger.combine": "task_arithmetic", "merger.alpha": 0.3},
                  description="DARE + task arithmetic: drop 50% at random, rescale 2×, θ0 + 0.3·Σ")
register_strategy("epimer", "adam", "epimer", "multitask", {"merger.k": 32, "merger.alpha": 1.0},
                  description="EpiMer: curvature-aware Fréchet sum in TSV-M's tagged subspace (k 32, α 1)")

# continual variants of the multi-task mergers (strategies/continual_multitask.py): step T under the
# independent protocol is the multitask merger on the same experts; all but c-iso-c keep state that grows with T
register_strategy("c-iso-c", "adam", "c_iso_c", "independent", {"merger.alpha": 1.0},
                  description="continual ISO-C: α·σ̄·UVᵀ of the running sum of task vectors, α = 1 (O(1) state)")
register_strategy("c-iso-cts", "adam", "c_iso_cts", "independent",
                  {"merger.alpha": 1.0, "merger.common_space_fraction": 0.8},
                  description="continual ISO-CTS: common (80%) + per-task subspaces of the tasks seen (keeps each task vector)")
register_strategy("c-tsv-m", "adam", "c_tsv_m", "independent", {"merger.alpha": 1.0},
                  description="continual TSV-M: each task's rank-r/T SVD factors kept, whitened at every step, α = 1")
register_strategy("c-epimer", "adam", "c_epimer", "independent", {"merger.k": 32, "merger.alpha": 1.0},
                  description="continual EpiMer: each task's rank-k factors and Fisher diagonal kept (k 32, α 1)")
