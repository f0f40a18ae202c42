"""One trial: data, models, LR schedules, config checks and the training loop (`run_trial`),
which knows nothing of MLflow or Optuna."""
