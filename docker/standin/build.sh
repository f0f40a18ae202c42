#!/usr/bin/env bash
# Stand-in base images for machines that reach no image registry (tests/docker uses them):
#   mnist-sweep-standin/python:3.11-slim   for python:3.11-slim   (Debian bookworm: python3.11, venv, CA certificates)
#   mnist-sweep-standin/postgres:15        for postgres:15        (Debian bookworm: postgresql-15 + an entry point
#                                                                   keeping the official image's env contract)
#   mnist-sweep-standin/debian:bookworm-pgbouncer  for debian:bookworm-slim as docker/pgbouncer's base
#                                                   (with Debian's pgbouncer already installed)
# Built from Debian's packages with mmdebstrap and `docker import` (~20 s each); an image that
# exists already is kept. Needs root, docker and mmdebstrap (apt-get install mmdebstrap).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
sources=("deb $mirror bookworm main" "deb ${mirror%/debian}/debian-security bookworm-security main")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

import_rootfs() {  # image-name packages...
    local image=$1; shift
    if docker image inspect "$image" >/dev/null 2>&1; then return; fi
    echo "building $image from Debian bookworm: $*"
    mmdebstrap --quiet --variant=minbase --include="$(IFS=,; echo "$*")" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$work/rootfs.tar" "${sources[@]}"
    docker import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$image" >/dev/null
    rm -f "$work/rootfs.tar"
}

import_rootfs mnist-sweep-standin/python:3.11-slim python3 python3-venv ca-certificates
import_rootfs mnist-sweep-standin/debian-postgresql:bookworm postgresql-15
import_rootfs mnist-sweep-standin/debian:bookworm-pgbouncer pgbouncer
if ! docker image inspect mnist-sweep-standin/postgres:15 >/dev/null 2>&1; then
    docker build --quiet -f "$here/postgres.Dockerfile" -t mnist-sweep-standin/postgres:15 "$here" >/dev/null
fi
echo "stand-in images ready"
