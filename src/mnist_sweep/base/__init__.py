"""Foundations every job uses: user-facing errors, store URLs and password masking, signals,
and Hydra's glue (composing a config, overrides). Imports nothing else of the package."""
