"""rigsa's Optuna sweeper for Hydra (hydra/sweeper=rigsa_optuna); Hydra finds plugins in the hydra_plugins package."""
