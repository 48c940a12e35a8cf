#!/usr/bin/env bash
# Build kvstore:latest on a machine whose Docker Engine cannot pull images
# (no container registry), from local parts only:
#
#   1. a base image kvstore-base:bookworm: a Debian 12 root filesystem with
#      python3 (3.11) + python3-venv, made by mmdebstrap (or debootstrap) through
#      this machine's apt configuration, then `docker import`ed. Built once and
#      kept: later runs reuse it (--rebuild-base forces a new one);
#   2. wheels of kvstore's dependencies (and of setuptools/wheel, to build kvstore
#      itself) made on this host by `pip wheel` into build/docker-wheels/, through
#      this host's pip configuration. Remade only when pyproject.toml changes;
#   3. `docker build --network none` of the repository's Dockerfile on that base
#      with OFFLINE=1: the build stage installs from build/docker-wheels with
#      `pip --no-index --find-links`, so the image build itself has no network.
#
# A machine that can pull needs none of this: `docker compose build` (or
# `docker build -t kvstore:latest .`) uses the official python:3.11-slim base.
#
# Usage: scripts/build-offline-image.sh [--rebuild-base] [--base-only]
# Env:   KVSTORE_IMAGE (kvstore:latest), KVSTORE_BASE_IMAGE (kvstore-base:bookworm),
#        KVSTORE_HOST_PYTHON (a Python 3.11 on this host that has pip; default:
#        .venv/bin/python if present, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${KVSTORE_IMAGE:-kvstore:latest}"
BASE_IMAGE="${KVSTORE_BASE_IMAGE:-kvstore-base:bookworm}"
BUILD_STAGE_IMAGE="${IMAGE%%:*}-build-cache:latest"   # the Dockerfile's build stage, kept as cache
SUITE=bookworm               # Debian 12: its python3 is 3.11, the version the wheels are built for
PY_MINOR=3.11
WHEEL_DIR="$ROOT/build/docker-wheels"   # inside the build context (build/ is git-ignored)
REBUILD_BASE=0
BASE_ONLY=0

for arg in "$@"; do
    case "$arg" in
        --rebuild-base) REBUILD_BASE=1 ;;
        --base-only) BASE_ONLY=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "build-offline-image: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf 'build-offline-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

docker info >/dev/null 2>&1 || die "docker info failed: no usable Docker Engine"

mkdir -p "$ROOT/build"
# One build at a time (a test run and a person may start this together).
exec 9>"$ROOT/build/.docker-build.lock"
flock 9

TMP="$(mktemp -d "${TMPDIR:-/tmp}/kvstore-docker.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root for: $*"; fi
}

ensure_bootstrapper() {
    if command -v mmdebstrap >/dev/null || command -v debootstrap >/dev/null; then return 0; fi
    command -v apt-get >/dev/null || die "neither mmdebstrap nor debootstrap is installed, and there is no apt-get to install them"
    log "installing mmdebstrap with apt-get"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >"$TMP/apt.log" 2>&1; then
        as_root apt-get update -qq >>"$TMP/apt.log" 2>&1 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >>"$TMP/apt.log" 2>&1 \
            || { cat "$TMP/apt.log" >&2; die "apt-get install mmdebstrap failed"; }
    fi
}

build_base() {
    local t0 rootfs="$TMP/rootfs.tar"
    t0="$(now)"
    ensure_bootstrapper
    # Only what a Python service needs; no apt, docs, man pages or translations.
    local pkgs=python3,python3-venv
    if command -v mmdebstrap >/dev/null; then
        log "making a Debian $SUITE root filesystem with mmdebstrap (apt sources of this machine)"
        as_root mmdebstrap --quiet --variant=essential --include="$pkgs" \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --dpkgopt='path-exclude=/usr/share/info/*' \
            "$SUITE" "$rootfs" >"$TMP/bootstrap.log" 2>&1 \
            || { tail -n 30 "$TMP/bootstrap.log" >&2; die "mmdebstrap failed"; }
    else
        log "making a Debian $SUITE root filesystem with debootstrap"
        as_root debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$TMP/rootfs" \
            >"$TMP/bootstrap.log" 2>&1 || { tail -n 30 "$TMP/bootstrap.log" >&2; die "debootstrap failed"; }
        as_root rm -rf "$TMP/rootfs/var/cache/apt/archives"/*.deb "$TMP/rootfs/var/lib/apt/lists"/*
        as_root tar -C "$TMP/rootfs" --numeric-owner -cf "$rootfs" .
        as_root rm -rf "$TMP/rootfs"
    fi
    log "importing it as $BASE_IMAGE"
    docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' \
        -c "LABEL org.kvstore.base=debian-$SUITE-python3" \
        -m "kvstore offline base: Debian $SUITE + python3 + python3-venv" \
        "$rootfs" "$BASE_IMAGE" >/dev/null
    as_root rm -f "$rootfs"
    docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version' \
        || die "$BASE_IMAGE has no working python3 3.11 with venv"
    log "base image $BASE_IMAGE built in $(elapsed "$t0") s"
}

host_python() {
    local py="${KVSTORE_HOST_PYTHON:-}"
    if [ -z "$py" ]; then
        if [ -x "$ROOT/.venv/bin/python" ]; then py="$ROOT/.venv/bin/python"; else py=python3; fi
    fi
    "$py" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$PY_MINOR' else 1)" \
        || die "$py is not Python $PY_MINOR: the wheels must match the image's python3 ($PY_MINOR); set KVSTORE_HOST_PYTHON"
    "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip"
    printf '%s' "$py"
}

build_wheels() {
    local t0 py stamp key
    t0="$(now)"
    py="$(host_python)"
    # The dependency set is a function of pyproject.toml and the Python version.
    key="$( { cat "$ROOT/pyproject.toml"; "$py" -c 'import sys, platform; print(sys.version_info[:2], platform.machine())'; } | sha256sum | cut -d' ' -f1)"
    stamp="$WHEEL_DIR/.key"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        log "wheels in build/docker-wheels are up to date (pyproject.toml unchanged)"
        return 0
    fi
    log "building wheels of kvstore's dependencies on this host (pip, as configured here)"
    rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR" "$TMP/src"
    # Build from a copy so the work tree gets no build/ or egg-info litter.
    cp "$ROOT/pyproject.toml" "$TMP/src/"
    [ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$TMP/src/"
    cp -r "$ROOT/kvstore" "$TMP/src/"
    "$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WHEEL_DIR" \
        "$TMP/src" 'setuptools>=68' wheel >"$TMP/pip.log" 2>&1 \
        || { tail -n 30 "$TMP/pip.log" >&2; die "pip wheel failed"; }
    # kvstore itself is built from the source inside the image build; keep only its dependencies here.
    rm -f "$WHEEL_DIR"/kvstore-*.whl
    printf '%s\n' "$key" >"$stamp"
    log "wheels built in $(elapsed "$t0") s: $(find "$WHEEL_DIR" -name '*.whl' | wc -l) files, $(du -sh "$WHEEL_DIR" | cut -f1)"
}

build_image() {
    local t0 args
    t0="$(now)"
    log "building $IMAGE from Dockerfile on $BASE_IMAGE, without network"
    args=(--network none --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg OFFLINE=1 -f "$ROOT/Dockerfile")
    # The classic builder, which every Docker Engine has (BuildKit needs buildx, which may be absent).
    # The build stage gets its own tag so its layers stay as the cache of the next run, and
    # the stage image the tag moved away from can be pruned: no pile of <none> images.
    { DOCKER_BUILDKIT=0 docker build --force-rm "${args[@]}" --target build -t "$BUILD_STAGE_IMAGE" "$ROOT" &&
      DOCKER_BUILDKIT=0 docker build --force-rm "${args[@]}" -t "$IMAGE" "$ROOT"
    } >"$TMP/build.log" 2>&1 || { tail -n 40 "$TMP/build.log" >&2; die "docker build failed"; }
    # Only untagged images made by this script (by label); images used by a container are kept.
    docker image prune --force --filter label=org.kvstore.stage=build >/dev/null
    docker image prune --force --filter label=org.kvstore.stage=node >/dev/null
    docker image prune --force --filter label=org.kvstore.base >/dev/null   # a base replaced by --rebuild-base
    log "image $IMAGE built in $(elapsed "$t0") s"
}

T0="$(now)"
if [ "$REBUILD_BASE" = 1 ] || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    build_base
else
    log "base image $BASE_IMAGE already exists (cached; --rebuild-base to remake it)"
fi
if [ "$BASE_ONLY" = 0 ]; then
    build_wheels
    build_image
fi
log "done in $(elapsed "$T0") s"
