# Stand-in for postgres:15 (see postgres-entrypoint.sh); BASE: Debian bookworm with postgresql-15.
ARG BASE=mnist-sweep-standin/debian-postgresql:bookworm
FROM ${BASE}
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
