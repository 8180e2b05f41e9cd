#!/bin/sh
# A new cluster in $PGDATA (an emptyDir: every start is a new, empty server), the role postgres
# with the password of $POSTGRES_PASSWORD and password (scram-sha-256) authentication for every
# connection, local or not; then postgres in the foreground, listening on every address.
set -eu
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "nightjar-postgres: POSTGRES_PASSWORD is empty: refusing to start a server without a password" >&2
    exit 1
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    printf '%s\n' "$POSTGRES_PASSWORD" | initdb --pgdata="$PGDATA" --username=postgres --pwfile=/dev/stdin \
        --auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
fi
unset POSTGRES_PASSWORD
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
