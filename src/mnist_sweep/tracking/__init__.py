"""MLflow: trials' runs (params, curves, datasets, status), the population members' run writer,
the deep links and descriptions a reviewer meets in `mlflow ui`, and the model registry."""
