"""Population mode's training: many trials of one model stacked into one, their schedules, and
the population trainer. Built on `trial`; knows nothing of MLflow or Optuna."""
