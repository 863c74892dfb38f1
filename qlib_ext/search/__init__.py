"""Model-based search: an Optuna ask-and-tell proposer over the task pool, and walk-forward pruning."""
