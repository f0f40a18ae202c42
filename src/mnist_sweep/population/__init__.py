"""Population mode's training: many trials of one model stacked into one, their schedules, and
the population trainer. Built on `trial`; knows nothing of MLflow or Optuna."""

# What the members of one population share (searching one of these with population > 1 is
# refused). Here, not in population.py: the sweep's checks read it without importing torch.
SHARED_KEYS = ("model", "data", "train.batch_size", "train.epochs", "train.device")
