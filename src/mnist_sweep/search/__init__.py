"""The sweep: search spaces and the sweep file, the Optuna study and its storage, the driver,
the workers (solo and population) and their bookkeeping, and the parent run's report."""
