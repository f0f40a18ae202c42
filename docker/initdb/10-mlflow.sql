-- The optuna database is POSTGRES_DB; the tracking server gets its own.
CREATE DATABASE mlflow;
