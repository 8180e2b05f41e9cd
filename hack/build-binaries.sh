#!/usr/bin/env bash
# Build the local stack's binaries from upstream source through the Go module proxy and
# cache them by version outside the repository:
#   $NIGHTJAR_CACHE/bin/kubernetes-<v>+<build>/{kube-apiserver,kube-controller-manager,kubectl,kubelet}
#   $NIGHTJAR_CACHE/bin/etcd-<v>/etcd
#   $NIGHTJAR_CACHE/bin/minio-<v>/minio
#   $NIGHTJAR_CACHE/bin/helm-<v>/helm
#   $NIGHTJAR_CACHE/bin/prometheus-<v>/promtool   (the chart's alert rules are tested with it)
# A component whose directory exists is never rebuilt. Each build goes to a temporary
# directory that is renamed into place only when every binary of it is built, so a failed
# or interrupted build never leaves a half-written binary in the cache.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${NIGHTJAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nightjar}
bindir=$cache/bin
mkdir -p "$bindir"

log() { printf '[build-binaries] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_go() {
  command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= 1.26 (https://go.dev/doc/install) and run again."
  local gover
  gover=$(go env GOVERSION | sed 's/^go//')
  case "$gover" in
    1.2[6-9]*|1.[3-9][0-9]*) ;;
    *) die "Go $gover is too old: Kubernetes $KUBERNETES_VERSION needs Go >= 1.26." ;;
  esac
  command -v curl >/dev/null 2>&1 || die "curl is not installed (apt-get install curl)."
}
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

# Runs "$@" in a fresh temp dir; on success renames $tmp/out to $dest.
build_into() {
  local dest=$1; shift
  if [ -d "$dest" ]; then return 0; fi
  need_go
  local tmp
  tmp=$(mktemp -d "$bindir/.build.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  log "building $(basename "$dest") (this takes a while on a cold cache)..."
  local start=$SECONDS
  if ! (cd "$tmp" && "$@"); then
    die "build of $(basename "$dest") failed; nothing was cached (see the output above)"
  fi
  mv "$tmp/out" "$dest"
  log "built $(basename "$dest") in $((SECONDS - start))s"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION staging=v0.${KUBERNETES_VERSION#v1.}
  mkdir -p w out
  cd w
  # k8s.io/kubernetes replaces its staging modules with ./staging paths, which a module
  # that depends on it cannot see: pin each one to its published v0.X.Y tag instead.
  curl -fsS "${GOPROXY_URL:-https://proxy.golang.org}/k8s.io/kubernetes/@v/$v.mod" -o upstream.mod \
    || go mod download -json "k8s.io/kubernetes@$v" >/dev/null
  [ -s upstream.mod ] || cp "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$v.mod" upstream.mod
  {
    echo "module nightjar.local/kubebuild"
    grep -E '^go ' upstream.mod
    grep -E '^godebug ' upstream.mod || true
    echo "require k8s.io/kubernetes $v"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' upstream.mod | awk -v s="$staging" '{print "replace " $1 " => " $1 " " s}'
  } > go.mod
  # Stamp the version as upstream's release builds do, so /version (and Helm's kubeVersion
  # checks) see v1.X.Y rather than v0.0.0-master.
  local minor=${v#v1.}; minor=${minor%%.*}
  local stamp="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    stamp+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  GOFLAGS="$GOFLAGS -mod=mod" go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags="-s -w$stamp" \
    -o ../out/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet
  cd .. && rm -rf w
}

build_etcd() {
  mkdir -p w out
  cd w
  printf 'module nightjar.local/etcdbuild\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  GOFLAGS="$GOFLAGS -mod=mod" go build -trimpath -ldflags='-s -w' -o ../out/etcd go.etcd.io/etcd/server/v3
  cd .. && rm -rf w
}

build_minio() {
  mkdir -p out
  GOBIN=$PWD/out go install -trimpath -ldflags='-s -w' "github.com/minio/minio@$MINIO_VERSION"
}

build_helm() {
  mkdir -p out
  GOBIN=$PWD/out go install -trimpath -ldflags='-s -w' "helm.sh/helm/${HELM_VERSION%%.*}/cmd/helm@$HELM_VERSION"
}

build_promtool() {
  mkdir -p w out
  cd w
  # A wrapper module, as for etcd: `go install pkg@version` refuses a module whose go.mod has
  # replace or exclude directives, and only promtool is wanted, not the server and its web UI.
  printf 'module nightjar.local/promtoolbuild\n\ngo 1.26\n\nrequire github.com/prometheus/prometheus %s\n' \
    "$PROMETHEUS_VERSION" > go.mod
  GOFLAGS="$GOFLAGS -mod=mod" go build -trimpath -ldflags='-s -w' -o ../out/promtool \
    github.com/prometheus/prometheus/cmd/promtool
  cd .. && rm -rf w
}

want=${*:-kubernetes etcd minio helm promtool}
for c in $want; do
  case $c in
    kubernetes) build_into "$bindir/kubernetes-$KUBERNETES_VERSION+$KUBERNETES_BUILD" build_kubernetes ;;
    etcd) build_into "$bindir/etcd-$ETCD_VERSION" build_etcd ;;
    minio) build_into "$bindir/minio-$MINIO_VERSION" build_minio ;;
    helm) build_into "$bindir/helm-$HELM_VERSION" build_helm ;;
    promtool) build_into "$bindir/prometheus-$PROMETHEUS_VERSION" build_promtool ;;
    *) die "unknown component: $c" ;;
  esac
done
