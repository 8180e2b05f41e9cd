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
#
# Extra CA certificates (a proxy that intercepts HTTPS, an internal mirror): put them in certs/ as
# PEM files named *.pem or *.crt (git ignores them there). apt and pip trust them while the image
# is built, and only then: each RUN that needs them makes a bundle in /tmp and deletes it, no ENV of
# the image names it, and the image does not trust them at run time. Without such files the build
# is the same as before. hack/build-image.sh (`make image`) passes the host's CA bundle this way.
# The Dockerfile keeps to what the legacy builder (DOCKER_BUILDKIT=0) reads: no RUN --mount.
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

# --- builder: nightjar and its dependencies installed into a venv -------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Extra CA certificates for pip (see above); this stage is not shipped.
COPY certs/ /tmp/extra-ca/

WORKDIR /src
# The dependencies first, from pyproject.toml alone (its [project].dependencies and what its
# [build-system] needs): a change to the code or the README reuses this layer and downloads or
# installs nothing again. pip updates itself first: the pip a base's Python bundles may be too old
# for today's packages (Debian 12's pip 23.0 backtracks without end on them); the versions are
# constraints.txt's, the set CI passed with (a new release cannot break the build). Compiled now, checked
# by hash rather than mtime (the final image runs with a read-only root filesystem and
# PYTHONDONTWRITEBYTECODE; the bytecode stays valid after COPY).
COPY pyproject.toml constraints.txt ./
RUN set -eu; \
    extra=$(find /tmp/extra-ca -maxdepth 1 -type f \( -name '*.pem' -o -name '*.crt' \) | sort); \
    if [ -n "$extra" ]; then \
        cat $(ls /etc/ssl/certs/ca-certificates.crt 2>/dev/null) $extra > /tmp/build-ca.pem; \
        export PIP_CERT=/tmp/build-ca.pem SSL_CERT_FILE=/tmp/build-ca.pem; \
    fi; \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' > /tmp/requirements.txt; \
    python -m venv /opt/nightjar; \
    /opt/nightjar/bin/python -m pip install --no-compile --upgrade pip; \
    /opt/nightjar/bin/pip install --no-compile -c constraints.txt -r /tmp/requirements.txt; \
    /opt/nightjar/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/nightjar/lib; \
    rm -rf /tmp/requirements.txt /tmp/build-ca.pem /tmp/extra-ca

# Then the code: built and installed without the network (no build isolation, no dependencies), the
# dependencies checked, and pip, setuptools and wheel taken out of the venv (nothing installs
# anything at run time). Only nightjar's own modules are compiled again.
COPY README.md ./
COPY operator ./operator
RUN /opt/nightjar/bin/pip install --no-deps --no-build-isolation --no-compile . \
    && /opt/nightjar/bin/pip check \
    && /opt/nightjar/bin/python -m pip uninstall -y pip setuptools wheel \
    && /opt/nightjar/bin/python -m compileall -q --invalidation-mode unchecked-hash \
        /opt/nightjar/lib/python3*/site-packages/nightjar

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

# Extra CA certificates for apt (see above): apt trusts them through a configuration file that the
# RUN below deletes with the bundle and the copy, so the image's filesystem keeps neither. (This
# COPY's own layer still holds the copy, as every COPY does; certificates are public, and nothing
# trusts them at run time.)
COPY certs/ /tmp/extra-ca/

# PostgreSQL clients: from PGDG, or from the distribution's own archive for a major it has (Debian
# 12 has 15). The build fails, naming each major, when a client of PG_MAJORS has no package in
# either (PGDG unreachable or without that major): an image that lacks a promised client would
# only show it when a backup of that major runs. The PGDG signing key comes from Debian's own
# postgresql-common package (verified by apt against Debian's archive key): no key is fetched from
# the network, no curl or gnupg is installed.
RUN set -eux; \
    extra=$(find /tmp/extra-ca -maxdepth 1 -type f \( -name '*.pem' -o -name '*.crt' \) | sort); \
    trust_extra() { \
        if [ -n "$extra" ]; then \
            cat $(ls /etc/ssl/certs/ca-certificates.crt 2>/dev/null) $extra > /tmp/build-ca.pem; \
            echo 'Acquire::https::CaInfo "/tmp/build-ca.pem";' > /etc/apt/apt.conf.d/00nightjar-build-ca; \
        fi; \
    }; \
    trust_extra; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    trust_extra; \
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
    apt-get update || echo "WARNING: apt-get update failed (above); the packages are checked below" >&2; \
    if ls /var/lib/apt/lists/*apt.postgresql.org*Packages* >/dev/null 2>&1; then pgdg="reached"; else \
        pgdg="unreachable"; \
        echo "WARNING: the PGDG repository (apt.postgresql.org) is unreachable: only the PostgreSQL clients of $PRETTY_NAME's own archive can be installed" >&2; \
    fi; \
    missing=""; \
    for major in ${PG_MAJORS}; do \
        candidate=$(apt-cache policy "postgresql-client-$major" | sed -n 's/^ *Candidate: *//p'); \
        case "$candidate" in \
            ""|"(none)") missing="$missing $major";; \
            *pgdg*) echo "postgresql-client-$major $candidate (PGDG)";; \
            *) echo "postgresql-client-$major $candidate ($PRETTY_NAME's archive)";; \
        esac; \
    done; \
    if [ -n "$missing" ]; then \
        echo "ERROR: no PostgreSQL client package for major(s)$missing (PG_MAJORS=\"${PG_MAJORS}\"; PGDG repository $pgdg)." >&2; \
        echo "ERROR: build where apt.postgresql.org is reachable, or with --build-arg PG_MAJORS/PG_MAJOR limited to majors that have a client." >&2; \
        exit 1; \
    fi; \
    pkgs=""; \
    for major in ${PG_MAJORS}; do pkgs="$pkgs postgresql-client-$major"; done; \
    apt-get install -y --no-install-recommends $pkgs; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/00nightjar-build-ca /tmp/build-ca.pem /tmp/extra-ca; \
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
