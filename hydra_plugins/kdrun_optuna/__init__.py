"""kdrun's Hydra sweeper for Optuna >= 4: persistent, shareable studies (``hydra/sweeper=kdrun_optuna``)."""
