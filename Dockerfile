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

# PostgreSQL client tools (psql, pg_dump, pg_restore) from the PGDG apt repository
# (apt.postgresql.org): one client per supported server major, side by side under
# /usr/lib/postgresql/<major>/bin. The agent asks the server its version (psql of the newest major,
# `SHOW server_version_num`) and runs pg_dump / pg_restore of the server's own major:
#   backups  of PostgreSQL 12 to 17 with that major's pg_dump (so 12 to 15 give archive version
#            1.14, the one Mendix Cloud takes);
#   restores into PostgreSQL 12 to 17 with that major's pg_restore (pg_restore 17's
#            `SET transaction_timeout = 0` never reaches a server before 17).
# docs/upgrading.md has the matrix; tests/unit/test_dockerfile.py keeps PG_MAJORS equal to its
# rows. PG_MAJOR is the newest of PG_MAJORS: it is on PATH (for people in a shell) and its psql
# asks the server's version. NIGHTJAR_PG_BINDIR, when set on the agent, overrides the choice.
ARG PG_MAJORS="12 13 14 15 16 17"
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

ARG PG_MAJORS
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
    case " ${PG_MAJORS} " in *" ${PG_MAJOR} "*) ;; *) echo "PG_MAJOR ${PG_MAJOR} is not in PG_MAJORS" >&2; exit 1;; esac; \
    pkgs=""; \
    for major in ${PG_MAJORS}; do pkgs="$pkgs postgresql-client-$major"; done; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    for major in ${PG_MAJORS}; do \
        for tool in psql pg_dump pg_restore; do "/usr/lib/postgresql/$major/bin/$tool" --version; done; \
    done

# uid/gid 65532 = OperatorConfig.agent_run_as_user, the user the Jobs' pods run as. No home, no
# login shell: the agent runs argv lists, never a shell, and the Jobs set HOME=/tmp (an emptyDir).
RUN groupadd --system --gid 65532 nightjar \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nightjar

# Owned by root and read-only for the user that runs it.
COPY --from=builder /opt/nightjar /opt/nightjar

# The agent runs the client of the server's major from NIGHTJAR_PG_ROOT/<major>/bin; an agent
# env NIGHTJAR_PG_BINDIR (not set here) overrides that with one directory. The newest major is on
# PATH for people in a shell, before /usr/bin, where Debian's pg_wrapper would pick a version by
# itself.
ENV PATH="/opt/nightjar/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH}" \
    NIGHTJAR_PG_ROOT="/usr/lib/postgresql" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532

ENTRYPOINT ["nightjar"]
CMD ["operator"]
