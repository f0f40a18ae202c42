#!/bin/sh
# Entry point of the mnist-sweep image: secrets in, privileges out.
#
# PGPASSWORD_FILE names a file holding the PostgreSQL password (a compose or Kubernetes secret,
# mounted read-only for root). Its content becomes PGPASSWORD, which libpq uses for every
# postgresql:// URL that carries no password: the Optuna storage (SWEEP_STORAGE) and the MLflow
# server's backend store. So the password is neither on a command line (ps, docker inspect) nor
# in the container's configured environment (docker inspect).
#
# Started as root (to read the secret), it then runs the command as the unprivileged user
# `sweep`, like the official postgres image does with its own user.
set -eu
if [ -n "${PGPASSWORD_FILE:-}" ]; then
    PGPASSWORD="$(cat "$PGPASSWORD_FILE")"
    export PGPASSWORD
    unset PGPASSWORD_FILE
fi
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=sweep --regid=sweep --init-groups -- "$@"
fi
exec "$@"
