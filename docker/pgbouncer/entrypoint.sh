#!/bin/sh
# Entry point of the compose stack's PgBouncer: the password from the compose secret into its
# auth file (mode 600, readable by `postgres` alone), then PgBouncer as `postgres` (it refuses
# root), in transaction mode, in front of $UPSTREAM_HOST:$UPSTREAM_PORT's databases optuna (at most
# $STUDY_POOL_SIZE PostgreSQL connections, for any number of workers) and mlflow (at most
# $MLFLOW_POOL_SIZE: 40 request threads per MLflow server process, x processes, + 1, so that
# MLflow's log_batch, which holds one connection while it waits for a second, cannot deadlock).
set -eu
: "${PGPASSWORD_FILE:?set PGPASSWORD_FILE to the secret holding the PostgreSQL password}"
PGUSER=${PGUSER:-mnist}
UPSTREAM_HOST=${UPSTREAM_HOST:-postgres}
UPSTREAM_PORT=${UPSTREAM_PORT:-5432}
STUDY_POOL_SIZE=${STUDY_POOL_SIZE:-15}
MLFLOW_POOL_SIZE=${MLFLOW_POOL_SIZE:-81}
run=/run/pgbouncer
mkdir -p "$run"
chown postgres "$run"
umask 077
# auth file format: "user" "password", a double quote inside written twice
printf '"%s" "%s"\n' "$PGUSER" "$(sed 's/"/""/g' "$PGPASSWORD_FILE")" > "$run/userlist.txt"
unset PGPASSWORD_FILE
cat > "$run/pgbouncer.ini" <<INI
[databases]
optuna = host=$UPSTREAM_HOST port=$UPSTREAM_PORT dbname=optuna pool_size=$STUDY_POOL_SIZE max_db_connections=$STUDY_POOL_SIZE
mlflow = host=$UPSTREAM_HOST port=$UPSTREAM_PORT dbname=mlflow pool_size=$MLFLOW_POOL_SIZE max_db_connections=$MLFLOW_POOL_SIZE
[pgbouncer]
listen_addr = *
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $run/userlist.txt
pool_mode = transaction
reserve_pool_size = 0
max_client_conn = 5000
query_wait_timeout = 300
log_connections = 0
log_disconnections = 0
INI
chown postgres "$run/userlist.txt" "$run/pgbouncer.ini"
ulimit -n 8192 2>/dev/null || true
exec setpriv --reuid=postgres --regid=postgres --init-groups -- pgbouncer "$run/pgbouncer.ini"
