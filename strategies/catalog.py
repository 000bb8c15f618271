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
