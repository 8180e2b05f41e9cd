# Nightjar: one image for the operator (`nightjar operator`, the default command) and for the
# backup and restore Jobs it starts (`nightjar agent backup|restore ...`).
#
#   docker build -t ghcr.io/nightjar-dev/nightjar:0.1.0 .
#
# Base image: pinned by tag, the same for both stages (the venv built in the first stage runs on
# the interpreter of the second, at the same path). For a reproducible build pin it by digest as
# well: look the digest up with
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# and build with
#   --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# (or write that reference below). The Python minor version must satisfy `requires-python` in
# pyproject.toml; tests/unit/test_dockerfile.py checks it.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# PostgreSQL client tools (pg_dump, pg_restore) from the PGDG apt repository (apt.postgresql.org).
# Support matrix with PG_MAJOR=17 (docs/upgrading.md has the table; a test keeps them in step):
#   backups  (pg_dump 17):    PostgreSQL servers 12, 13, 14, 15, 16 and 17;
#                             pg_dump refuses a server newer than itself (18 and later).
#   restores (pg_restore 17): into PostgreSQL 17. Into 12 to 16 the restore fails before it
#                             changes anything: pg_restore 17 starts with
#                             `SET transaction_timeout = 0`, which those servers do not know, and
#                             Nightjar runs it with --exit-on-error in one transaction.
# For an environment whose servers are all on one older major, build with
# --build-arg PG_MAJOR=<that major>: restores into it then work, backups of newer servers do not.
ARG PG_MAJOR=17
# Keep in step with [project].version in pyproject.toml (a test checks it).
ARG VERSION=0.1.0

# --- builder: a wheel of nightjar, installed with its dependencies into a venv -------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY operator ./operator

# pip and setuptools leave the venv once it is filled: nothing installs anything at run time. The
# final image runs with a read-only root filesystem and PYTHONDONTWRITEBYTECODE, so everything is
# compiled now, checked by hash rather than mtime (the bytecode stays valid after COPY).
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv /opt/nightjar \
    && /opt/nightjar/bin/pip install /dist/nightjar-*.whl \
    && /opt/nightjar/bin/python -m pip uninstall -y pip setuptools \
    && /opt/nightjar/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/nightjar/lib

# --- runtime: the same base, the PostgreSQL client, the venv; no compilers, no build tools ------
FROM ${BASE_IMAGE} AS runtime

ARG PG_MAJOR
ARG VERSION
ARG SOURCE_URL=https://github.com/nightjar-dev/nightjar

LABEL org.opencontainers.image.title="nightjar" \
      org.opencontainers.image.description="Kubernetes operator that backs up and restores PostgreSQL databases and file documents to S3" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The PGDG signing key comes from Debian's own postgresql-common package (verified by apt against
# Debian's archive key): no key is fetched from the network, no curl or gnupg is installed.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    mkdir /tmp/pgdg; \
    cd /tmp/pgdg; \
    apt-get download postgresql-common; \
    dpkg-deb -x postgresql-common_*.deb extracted; \
    install -m 0644 extracted/usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg \
        /usr/share/keyrings/apt.postgresql.org.gpg; \
    cd /; \
    rm -rf /tmp/pgdg; \
    . /etc/os-release; \
    printf 'Types: deb\nURIs: https://apt.postgresql.org/pub/repos/apt\nSuites: %s-pgdg\nComponents: main\nSigned-By: /usr/share/keyrings/apt.postgresql.org.gpg\n' \
        "$VERSION_CODENAME" > /etc/apt/sources.list.d/pgdg.sources; \
    apt-get update; \
    apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}"; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_restore" --version

# uid/gid 65532 = OperatorConfig.agent_run_as_user, the user the Jobs' pods run as. No home, no
# login shell: the agent runs argv lists, never a shell, and the Jobs set HOME=/tmp (an emptyDir).
RUN groupadd --system --gid 65532 nightjar \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nightjar

# Owned by root and read-only for the user that runs it.
COPY --from=builder /opt/nightjar /opt/nightjar

# The agent finds pg_dump and pg_restore through NIGHTJAR_PG_BINDIR (else PATH). The versioned
# directory comes before /usr/bin, where Debian's pg_wrapper would pick a version by itself.
ENV PATH="/opt/nightjar/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH}" \
    NIGHTJAR_PG_BINDIR="/usr/lib/postgresql/${PG_MAJOR}/bin" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532

ENTRYPOINT ["nightjar"]
CMD ["operator"]
