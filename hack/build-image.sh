#!/usr/bin/env bash
# Build the Nightjar image (the Dockerfile) with dockerd's legacy builder, and optionally import it
# into a containerd (the local stack's, for its kubelet).
#
#   hack/build-image.sh [options]          (make image IMAGE_ARGS="...")
#
#   --state DIR        dockerd's data, its log and the image tarball; default .local/image
#                      ($NIGHTJAR_IMAGE_STATE)
#   --tag TAG          the image's tag; default nightjar:dev ($NIGHTJAR_IMAGE)
#   --base IMAGE       the base image; default the Dockerfile's BASE_IMAGE when present or pullable,
#                      else a stand-in built here from Debian's packages (local/python:<tag>)
#   --local-base       do not try to pull the base image; use the stand-in
#   --pg-majors "N.."  PG_MAJORS (the newest becomes PG_MAJOR); default the Dockerfile's, or the
#                      majors Debian's own archive has (15) when the stand-in is used
#   --scratch-majors "N.."  also build the scratch PostgreSQL server image of each major
#                      (images/scratch-postgres: nightjar-postgres:<major>, restore drills without a
#                      scratch Secret run it); default the majors Debian's own archive has (bookworm:
#                      15); "" builds none
#   --no-host-ca       do not give the build the host's CA bundle (see certs/README.md)
#   --import SOCKET    then import the image and the pause image into the containerd at SOCKET
#                      (namespace k8s.io), as `ctr -a SOCKET -n k8s.io images import`
#   --no-build         with --import: import the tarballs of the last build, without dockerd
#   --pause-only       only make sure the pause image is cached (the local stack's real node needs
#                      it, not the project image), and exit
#   --keep-dockerd     leave running the dockerd this script started (a later run reuses it)
#   --stop-dockerd     stop a dockerd kept by an earlier run, and exit
#
# Docker: a daemon at $DOCKER_HOST or /var/run/docker.sock is used when one answers; otherwise this
# script starts its own dockerd (Debian's docker.io, installed when missing) with its data root,
# exec root, pid file, socket and log under the state directory, and stops it at the end.
#
# Base images, when the Dockerfile's base cannot be pulled (no Docker Hub here):
#   local/debian:<release>   debootstrap --variant=minbase from the machine's own Debian mirror
#   local/python:<tag>       FROM it, with Debian's python3, python3-venv, python3-pip
#   local/pause:3.10         the Kubernetes pause binary, compiled from the Kubernetes module's
#                            build/pause/linux/pause.c (gcc -Os -static), for a containerd sandbox
# Each is cached per machine as a `docker save` tarball under
# ${NIGHTJAR_CACHE:-~/.cache/nightjar}/images/, named by a hash of its recipe (the functions below
# that build it): a second run loads it rather than building it again. A cache file is written
# under a temporary name and renamed when complete.
#
# The project image is saved to <state>/image.tar (its id in <state>/image.id: the digest of its
# config, which containerd shows as the image's id once imported), written the same way. A failed
# build exits non-zero with its last 40 lines and leaves no new tarball (the last good one stays).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$repo/hack/versions.env"

state=${NIGHTJAR_IMAGE_STATE:-$repo/.local/image}
tag=${NIGHTJAR_IMAGE:-nightjar:dev}
cache=${NIGHTJAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nightjar}
imgcache=$cache/images
base=""
local_base=0
pg_majors=""
scratch_majors=default
scratch_repo=nightjar-postgres
host_ca=1
import_socket=""
build=1
keep_dockerd=0
stop_only=0
pause_only=0
pause_tag=local/pause:3.10

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --state) state=${2:?--state needs a directory}; shift 2 ;;
    --tag) tag=${2:?--tag needs a tag}; shift 2 ;;
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --local-base) local_base=1; shift ;;
    --pg-majors) pg_majors=${2:?--pg-majors needs majors}; shift 2 ;;
    --scratch-majors) scratch_majors=${2?--scratch-majors needs majors (or "")}; shift 2 ;;
    --no-host-ca) host_ca=0; shift ;;
    --import) import_socket=${2:?--import needs a containerd socket}; shift 2 ;;
    --no-build) build=0; shift ;;
    --keep-dockerd) keep_dockerd=1; shift ;;
    --stop-dockerd) stop_only=1; shift ;;
    --pause-only) pause_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown option $1 (--help lists them)" ;;
  esac
done
[ "$build" = 1 ] || [ -n "$import_socket" ] || die "--no-build only makes sense with --import"
mkdir -p "$state"
state=$(cd "$state" && pwd)

docker_dir=$state/docker
dpidfile=$state/dockerd.pid
dlog=$state/dockerd.log
dsock=$state/docker.sock
xroot=$docker_dir/exec
# dockerd's containerd puts its sockets under the exec root: a unix socket path has at most 107
# bytes, so a deep checkout gets a short exec root (and socket) under /run instead.
if [ $((${#xroot} + 40)) -gt 107 ] || [ ${#dsock} -gt 100 ]; then
  xroot=/run/nightjar-docker-$(printf '%s' "$state" | sha256sum | cut -c1-12)
  dsock=$xroot/docker.sock
fi
# What dockerd changes on the host and does not undo when it stops, recorded when this script
# starts it and undone when this script stops it (now or, with --keep-dockerd, later).
host_changes=$state/dockerd.host-changes
image_tar=$state/image.tar
build_log=$state/build.log

# --- cleanup: whatever this run made and must not leave behind -----------------------------------
cleanup_paths=()
started_pid=""

forward_policy_now() {
  iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p'
}

stop_dockerd() { # pid
  local pid=$1 _
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then return 0; fi
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "dockerd (pid $pid) did not stop within 30 s; killing it (its log: $dlog)"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  wait "$pid" 2>/dev/null || true
  rm -f "$dpidfile"
  # The docker0 bridge dockerd created, the iptables FORWARD policy it set to DROP.
  local made_docker0=0 forward_policy=""
  # shellcheck source=/dev/null
  [ -f "$host_changes" ] && . "$host_changes"
  if [ "$made_docker0" = 1 ] && ip link show docker0 >/dev/null 2>&1; then
    ip link delete docker0 2>/dev/null || log "could not delete the docker0 bridge dockerd made"
  fi
  if [ -n "$forward_policy" ] && [ "$forward_policy" != "$(forward_policy_now)" ]; then
    iptables -P FORWARD "$forward_policy" 2>/dev/null || log "could not restore the iptables FORWARD policy $forward_policy"
  fi
  rm -f "$host_changes"
}

on_exit() {
  local rc=$?
  local p
  for p in "${cleanup_paths[@]}"; do rm -rf --one-file-system "$p"; done
  if [ -n "$started_pid" ] && [ "$keep_dockerd" = 0 ]; then
    stop_dockerd "$started_pid"
  elif [ -n "$started_pid" ]; then
    log "dockerd keeps running (pid $started_pid, socket $dsock, log $dlog); stop it with $0 --stop-dockerd"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- packages ------------------------------------------------------------------------------------
apt_updated=0
need() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing: install $2 with your system's package manager"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "$1 is missing: run as root, or apt-get install $2"
    sudo=sudo
  fi
  log "installing $2 (apt-get) for $1..."
  if [ "$apt_updated" = 0 ]; then $sudo apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null \
    || die "apt-get install $2 failed"
  command -v "$1" >/dev/null 2>&1 || die "$2 is installed but $1 is not on PATH"
}

# --- dockerd -------------------------------------------------------------------------------------
DOCKER=${DOCKER:-docker}
answers() { "$DOCKER" -H "$1" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_dockerd() {
  [ "$(id -u)" -eq 0 ] || die "no Docker daemon answers and starting dockerd needs root: run as root or start Docker"
  need dockerd docker.io
  need iptables iptables
  mkdir -p "$docker_dir/data" "$xroot"
  [ "$xroot" = "$docker_dir/exec" ] || log "the state directory's path is long: exec root and socket go to $xroot"
  local stale
  if [ -f "$dpidfile" ]; then
    stale=$(cat "$dpidfile" 2>/dev/null || true)
    if [ -n "$stale" ] && [ "$(cat "/proc/$stale/comm" 2>/dev/null)" = dockerd ]; then
      die "dockerd (pid $stale, from $dpidfile) is running but does not answer at $dsock; stop it ($0 --stop-dockerd) or see its log: $dlog"
    fi
    rm -f "$dpidfile"
  fi
  if [ ! -f "$host_changes" ]; then
    local made=0
    ip link show docker0 >/dev/null 2>&1 || made=1
    printf 'made_docker0=%s\nforward_policy=%s\n' "$made" "$(forward_policy_now)" >"$host_changes"
  fi
  printf '\n==== %s: dockerd started by hack/build-image.sh\n' "$(date -u +%FT%TZ)" >>"$dlog"
  local start=$SECONDS
  dockerd --data-root "$docker_dir/data" --exec-root "$xroot" --pidfile "$dpidfile" \
    --host "unix://$dsock" --iptables=true >>"$dlog" 2>&1 </dev/null &
  started_pid=$!
  local _
  for _ in $(seq 1 120); do
    answers "unix://$dsock" && break
    if ! kill -0 "$started_pid" 2>/dev/null; then
      started_pid=""
      tail -n 20 "$dlog" >&2
      die "dockerd exited while starting; its log: $dlog"
    fi
    sleep 0.5
  done
  if ! answers "unix://$dsock"; then
    tail -n 20 "$dlog" >&2
    die "dockerd (pid $started_pid) did not answer at $dsock within 60 s; its log: $dlog"
  fi
  log "dockerd started in $((SECONDS - start)) s (pid $started_pid, socket $dsock, log $dlog)"
}

use_docker() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    answers "$DOCKER_HOST" || die "DOCKER_HOST=$DOCKER_HOST is set but no Docker daemon answers there"
    log "using the Docker daemon at $DOCKER_HOST"
  elif answers unix:///var/run/docker.sock; then
    export DOCKER_HOST=unix:///var/run/docker.sock
    log "using the Docker daemon at /var/run/docker.sock"
  elif [ -S "$dsock" ] && answers "unix://$dsock"; then
    export DOCKER_HOST=unix://$dsock
    log "using the dockerd kept by an earlier run (pid $(cat "$dpidfile" 2>/dev/null || echo '?'), socket $dsock)"
  else
    start_dockerd
    export DOCKER_HOST=unix://$dsock
  fi
}

if [ "$stop_only" = 1 ]; then
  pid=$(cat "$dpidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    stop_dockerd "$pid"
  elif [ -f "$dpidfile" ]; then
    log "no dockerd of $state is running (removing the stale $dpidfile)"
    rm -f "$dpidfile"
  fi
  exit 0
fi

# --- cached base images --------------------------------------------------------------------------
key_of() { sha256sum | cut -c1-16; }
label_of() { "$DOCKER" image inspect -f '{{index .Config.Labels "nightjar.recipe"}}' "$1" 2>/dev/null || true; }

# Makes sure image $1 of recipe key $3 is in the daemon: already there (its nightjar.recipe label),
# loaded from the cache, or built by function $2 (which labels it) and then saved to the cache.
cached_image() { # tag builder key
  local tag=$1 builder=$2 key=$3
  local name
  name=$(printf '%s' "$tag" | tr '/:' '__')
  local file=$imgcache/$name-$key.tar
  mkdir -p "$imgcache"
  local start=$SECONDS tmp
  if [ "$(label_of "$tag")" = "$key" ]; then
    log "$tag: in the daemon (recipe $key)"
    if [ ! -f "$file" ]; then
      tmp=$(mktemp "$imgcache/.$name-$key.XXXXXX")
      cleanup_paths+=("$tmp")
      "$DOCKER" save -o "$tmp" "$tag" || die "docker save $tag failed"
      mv -f "$tmp" "$file"
    fi
    return 0
  fi
  if [ -f "$file" ]; then
    "$DOCKER" load -q -i "$file" >/dev/null || die "docker load $file failed (delete it to rebuild)"
    [ "$(label_of "$tag")" = "$key" ] || die "$file did not hold $tag of recipe $key (delete it to rebuild)"
    log "$tag: loaded from $file in $((SECONDS - start)) s"
    return 0
  fi
  log "$tag: building (recipe $key)..."
  "$builder" "$tag" "$key"
  [ "$(label_of "$tag")" = "$key" ] || die "$tag was built without its recipe label"
  tmp=$(mktemp "$imgcache/.$name-$key.XXXXXX")
  cleanup_paths+=("$tmp")
  "$DOCKER" save -o "$tmp" "$tag" || die "docker save $tag failed"
  mv -f "$tmp" "$file"
  # Older recipes of the same image are of no more use.
  find "$imgcache" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
  log "$tag: built in $((SECONDS - start)) s, cached as $file"
}

# The machine's Debian mirror and security mirror, from its apt sources (deb822 or one-line).
apt_uri() { # suite-suffix ("" or "-security")
  local want=$release$1 found=""
  local deb822=(/etc/apt/sources.list.d/*.sources) oneline=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
  # deb822 stanzas: a "deb" stanza whose Suites has $want gives its first URI.
  found=$(awk -v want="$want" '
    function flush() { if (deb && has && uri != "" && found == "") found = uri; deb = 0; has = 0; uri = "" }
    FNR == 1 || /^[[:space:]]*$/ { flush() }
    /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) has = 1 }
    END { flush(); print found }' "${deb822[@]}" 2>/dev/null || true)
  if [ -z "$found" ]; then
    # One-line form: deb [options] URI suite components...
    found=$(awk -v want="$want" '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == want && found == "") found = $i }
      END { print found }' "${oneline[@]}" 2>/dev/null || true)
  fi
  printf '%s\n' "$found"
}

build_debian() { # tag key
  local tag=$1 key=$2
  need debootstrap debootstrap
  local mirror security root
  mirror=$(apt_uri "")
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  security=$(apt_uri "-security")
  root=$(mktemp -d "$state/debootstrap.XXXXXX")
  cleanup_paths+=("$root")
  log "debootstrap --variant=minbase $release from $mirror (a few minutes; log $state/debootstrap.log)"
  if ! debootstrap --variant=minbase "$release" "$root" "$mirror" >"$state/debootstrap.log" 2>&1; then
    findmnt -R -n -o TARGET "$root" 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    tail -n 40 "$state/debootstrap.log" >&2
    die "debootstrap failed; its log: $state/debootstrap.log"
  fi
  findmnt -R -n -o TARGET "$root" 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  # apt sources as in Debian's own images: the release, its updates and its security archive.
  rm -f "$root/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: %s\n' \
      "$mirror" "$release" "$release" /usr/share/keyrings/debian-archive-keyring.gpg
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: %s\n' \
        "$security" "$release" /usr/share/keyrings/debian-archive-keyring.gpg
    fi
  } >"$root/etc/apt/sources.list.d/debian.sources"
  # A machine whose apt reads a dated snapshot of the archive turns off the Valid-Until check; its
  # containers must too, or apt refuses the release files.
  if [ "$(apt-config dump Acquire::Check-Valid-Until 2>/dev/null)" = 'Acquire::Check-Valid-Until "false";' ]; then
    printf 'Acquire::Check-Valid-Until "false";\n' >"$root/etc/apt/apt.conf.d/99nightjar-check-valid-until"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar --numeric-owner -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
    | "$DOCKER" import -c 'CMD ["bash"]' -c "LABEL nightjar.recipe=$key" - "$tag" >/dev/null \
    || die "docker import of the debootstrapped $release failed"
  rm -rf --one-file-system "$root"
}

python_standin_dockerfile() {
  cat <<EOF
FROM $debian_tag
ENV LANG=C.UTF-8
RUN set -eux; \\
    apt-get update; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv python3-pip python-is-python3 ca-certificates; \\
    apt-get clean; \\
    rm -rf /var/lib/apt/lists/*; \\
    python --version
CMD ["python3"]
EOF
}

build_python() { # tag key
  local tag=$1 key=$2 out
  out=$(mktemp)
  cleanup_paths+=("$out")
  if ! python_standin_dockerfile | DOCKER_BUILDKIT=0 "$DOCKER" build --label "nightjar.recipe=$key" -t "$tag" - >"$out" 2>&1; then
    tail -n 40 "$out" >&2
    die "building the stand-in $tag failed"
  fi
  local have
  have=$("$DOCKER" run --rm "$tag" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$have" = "$python_version" ] || die "Debian $release's Python is $have; the Dockerfile's base is Python $python_version (use --base)"
}

pause_source() {
  local mod
  mod=$(go env GOMODCACHE)/k8s.io/kubernetes@$KUBERNETES_VERSION
  if [ ! -f "$mod/build/pause/linux/pause.c" ]; then
    log "downloading k8s.io/kubernetes@$KUBERNETES_VERSION into the Go module cache (for pause.c)"
    (cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$KUBERNETES_VERSION") >&2 \
      || die "go mod download k8s.io/kubernetes@$KUBERNETES_VERSION failed"
  fi
  printf '%s\n' "$mod/build/pause/linux/pause.c"
}

build_pause() { # tag key
  local tag=$1 key=$2 dir
  need gcc gcc
  dir=$(mktemp -d)
  cleanup_paths+=("$dir")
  gcc -Os -Wall -Werror -static -DVERSION="v$pause_version-k8s$KUBERNETES_VERSION" -o "$dir/pause" "$pause_c" \
    || die "compiling $pause_c failed (gcc -static needs libc6-dev)"
  strip "$dir/pause" 2>/dev/null || true
  tar --numeric-owner --owner=0 --group=0 -C "$dir" -c pause \
    | "$DOCKER" import -c 'ENTRYPOINT ["/pause"]' -c "LABEL nightjar.recipe=$key" - "$tag" >/dev/null \
    || die "docker import of the pause binary failed"
}

# --- the project image ---------------------------------------------------------------------------
dockerfile_base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$repo/Dockerfile" | head -n1)
base_tag=${dockerfile_base##*:}               # 3.11-slim-bookworm
release=${base_tag##*-}                       # bookworm
python_version=${base_tag%%-*}                # 3.11
debian_tag=local/debian:$release
standin_tag=local/python:$base_tag

go_needed() { command -v go >/dev/null 2>&1 || die "Go is needed for the Kubernetes pause source (go mod download); install Go"; }

# Sets pause_c (the source), pause_version (upstream's tag of it) and pause_key (its recipe's key).
pause_prepare() {
  go_needed
  pause_c=$(pause_source)
  pause_version=$(sed -n 's/^TAG ?= //p' "${pause_c%/linux/pause.c}/Makefile" 2>/dev/null || true)
  pause_version=${pause_version:-3.10}
  pause_key=$({ declare -f build_pause; sha256sum <"$pause_c"; echo "$pause_version"; } | key_of)
}

debian_key() {
  { declare -f build_debian; echo "$release $(dpkg --print-architecture 2>/dev/null || uname -m)"; } | key_of
}

base_images() {
  local dkey pkey
  dkey=$(debian_key)
  pkey=$({ echo "$dkey"; declare -f build_python python_standin_dockerfile; } | key_of)
  # The stand-in's cache holds every layer: the Debian base is only needed to build it.
  if [ "$(label_of "$standin_tag")" != "$pkey" ] && [ ! -f "$imgcache/$(printf '%s' "$standin_tag" | tr '/:' '__')-$pkey.tar" ]; then
    cached_image "$debian_tag" build_debian "$dkey"
  fi
  cached_image "$standin_tag" build_python "$pkey"
}

build_project() {
  local args=(--build-arg "BASE_IMAGE=$base")
  if [ -n "$pg_majors" ]; then
    local newest
    # shellcheck disable=SC2086 # a list of majors, one word each
    newest=$(printf '%s\n' $pg_majors | sort -n | tail -n1)
    args+=(--build-arg "PG_MAJORS=$pg_majors" --build-arg "PG_MAJOR=$newest")
  fi
  local host_bundle=/etc/ssl/certs/ca-certificates.crt ca_file=$repo/certs/.build-host-ca.pem
  if [ "$host_ca" = 1 ] && [ -s "$host_bundle" ]; then
    # A fixed mode and mtime: the same bundle keeps the build's layer cache.
    install -m 0644 "$host_bundle" "$ca_file"
    touch -d @0 "$ca_file"
    cleanup_paths+=("$ca_file")
  fi
  log "building $tag (FROM $base${pg_majors:+, PG_MAJORS=$pg_majors}; log $build_log)"
  local start=$SECONDS rc=0
  # The log gets everything; the terminal the steps (FROM, RUN, COPY) as they start.
  DOCKER_BUILDKIT=0 "$DOCKER" build "${args[@]}" -t "$tag" -f "$repo/Dockerfile" "$repo" 2>&1 \
    | tee "$build_log" | { grep --line-buffered -E '^Step [0-9]+/[0-9]+ : (FROM|RUN|COPY)' || true; } \
    | cut -c1-100 >&2 || rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    log "the last 40 lines of the build:"
    tail -n 40 "$build_log" | sed 's/\x1b\[[0-9;]*m//g' >&2
    die "docker build of $tag failed (exit $rc); the whole log: $build_log"
  fi
  build_seconds=$((SECONDS - start))
  local id
  id=$("$DOCKER" image inspect -f '{{.Id}}' "$tag")
  if [ -f "$image_tar" ] && [ "$(cat "$state/image.id" 2>/dev/null)" = "$id" ]; then
    log "$tag built in $build_seconds s; $image_tar already holds it"
  else
    local tmp
    tmp=$(mktemp "$state/.image.XXXXXX")
    cleanup_paths+=("$tmp")
    start=$SECONDS
    "$DOCKER" save -o "$tmp" "$tag" || die "docker save $tag failed"
    mv -f "$tmp" "$image_tar"
    printf '%s\n' "$id" >"$state/image.id"
    log "$tag built in $build_seconds s, saved to $image_tar in $((SECONDS - start)) s"
  fi
  local size
  size=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
  log "$tag: $id, $((size / 1000000)) MB"
}

# The scratch PostgreSQL server images (images/scratch-postgres/Dockerfile), one per major: FROM
# the Debian base of the stand-in (local/debian, cached like it) when the stand-in is used, else
# FROM the project image's base; a warm build is all layer cache. Each is saved to
# <state>/nightjar-postgres-<major>.tar (its id beside it) only when its id changed.
build_scratch() {
  local major sbase=$base
  [ -n "$scratch_majors" ] || return 0
  if [ "$base" = "$standin_tag" ]; then
    cached_image "$debian_tag" build_debian "$(debian_key)"
    sbase=$debian_tag
  fi
  for major in $scratch_majors; do
    local stag=$scratch_repo:$major slog=$state/build-postgres-$major.log start=$SECONDS rc=0
    local star=$state/nightjar-postgres-$major.tar sid=$state/nightjar-postgres-$major.id
    DOCKER_BUILDKIT=0 "$DOCKER" build --build-arg "BASE_IMAGE=$sbase" --build-arg "PG_MAJOR=$major" \
      -t "$stag" -f "$repo/images/scratch-postgres/Dockerfile" "$repo" >"$slog" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
      tail -n 40 "$slog" | sed 's/\x1b\[[0-9;]*m//g' >&2
      die "docker build of $stag failed (exit $rc); the whole log: $slog"
    fi
    local id
    id=$("$DOCKER" image inspect -f '{{.Id}}' "$stag")
    if [ -f "$star" ] && [ "$(cat "$sid" 2>/dev/null)" = "$id" ]; then
      log "$stag built in $((SECONDS - start)) s; $star already holds it"
    else
      local tmp
      tmp=$(mktemp "$state/.postgres.XXXXXX")
      cleanup_paths+=("$tmp")
      "$DOCKER" save -o "$tmp" "$stag" || die "docker save $stag failed"
      mv -f "$tmp" "$star"
      printf '%s\n' "$id" >"$sid"
      log "$stag built and saved to $star in $((SECONDS - start)) s"
    fi
  done
}

import_into() { # socket
  local sock=$1 ptar
  need ctr containerd
  [ -S "$sock" ] || die "no containerd socket at $sock (is the stack's containerd running?)"
  [ -f "$image_tar" ] || die "no image tarball at $image_tar: build it first (without --no-build)"
  ptar=$(cat "$state/pause.tar.path" 2>/dev/null || true)
  [ -f "$ptar" ] || die "no pause image tarball (${ptar:-none recorded}): build first (without --no-build)"
  local t start=$SECONDS
  local scratch_tars=()
  for t in "$state"/nightjar-postgres-*.tar; do [ -f "$t" ] && scratch_tars+=("$t"); done
  for t in "$image_tar" "$ptar" "${scratch_tars[@]}"; do
    ctr -a "$sock" -n k8s.io images import "$t" >/dev/null \
      || die "ctr -a $sock -n k8s.io images import $t failed"
  done
  log "imported $tag and $pause_tag into the containerd at $sock (namespace k8s.io) in $((SECONDS - start)) s"
}

total_start=$SECONDS
build_seconds=0
if [ "$pause_only" = 1 ]; then
  use_docker
  pause_prepare
  cached_image "$pause_tag" build_pause "$pause_key"
  printf '%s/%s-%s.tar\n' "$imgcache" "$(printf '%s' "$pause_tag" | tr '/:' '__')" "$pause_key" >"$state/pause.tar.path"
  log "done in $((SECONDS - total_start)) s"
  exit 0
fi
if [ "$build" = 1 ]; then
  use_docker
  phase=$SECONDS
  if [ -z "$base" ]; then
    if [ "$local_base" = 0 ] && { "$DOCKER" image inspect "$dockerfile_base" >/dev/null 2>&1 \
        || timeout 60 "$DOCKER" pull -q "$dockerfile_base" >/dev/null 2>&1; }; then
      base=$dockerfile_base
    else
      [ "$local_base" = 1 ] || log "$dockerfile_base cannot be pulled: using a stand-in built from Debian's packages"
      base_images
      base=$standin_tag
      # Debian's own archive has one PostgreSQL major per release; PGDG may be out of reach.
      if [ -z "$pg_majors" ]; then
        pg_majors=$(case "$release" in bookworm) echo 15 ;; trixie) echo 17 ;; *) echo "" ;; esac)
      fi
    fi
  fi
  pause_prepare
  cached_image "$pause_tag" build_pause "$pause_key"
  printf '%s/%s-%s.tar\n' "$imgcache" "$(printf '%s' "$pause_tag" | tr '/:' '__')" "$pause_key" >"$state/pause.tar.path"
  log "base images ready in $((SECONDS - phase)) s"
  build_project
  if [ "$scratch_majors" = default ]; then
    scratch_majors=$(case "$release" in bookworm) echo 15 ;; trixie) echo 17 ;; *) echo "" ;; esac)
  fi
  build_scratch
fi
if [ -n "$import_socket" ]; then
  import_into "$import_socket"
fi
log "done in $((SECONDS - total_start)) s"
