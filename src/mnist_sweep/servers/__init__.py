"""The stores' servers and files: the SQLite stores of a sweep on one machine, and PostgreSQL,
PgBouncer and the MLflow server for many machines (`make server`)."""
