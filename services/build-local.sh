#!/usr/bin/env bash
# Builds HiveMiner's images on a machine that reaches only Debian's and Python's package registries
# (no Docker Hub): `make images` runs it. As root (debootstrap), with a Docker engine (DOCKER_HOST).
#
#   1. base:      Debian bookworm minbase (debootstrap) + python3 (3.11), python3-venv, tini and
#                 redis-server, `docker import`ed as hivetrain-base:bookworm-<key>. Also the Redis image.
#   2. wheelhouse: every file of services/requirements.lock (hashes checked), `pip download`ed on the
#                 host for CPython 3.11 / manylinux x86_64; the three sdist-only hivemind dependencies
#                 come as their hashed sdists and are built inside the image.
#   3. images:    hivetrain-bootstrap, hivetrain-miner, hivetrain-validator (:local) from those two,
#                 `pip install --no-index --find-links /wheels --require-hashes` inside the build.
#
# Cached under $HIVE_IMAGE_CACHE (default ~/.cache/hivetrain-images): the base root filesystem as a
# tarball keyed by its package list, the wheelhouse keyed by the lock file's hash. A second run on a
# fresh engine only imports the tarball and rebuilds the images.
#
# Environment: HIVE_IMAGE_TAG (local), HIVE_IMAGE_CACHE, DEBIAN_MIRROR (http://deb.debian.org/debian),
# PYTHON (python3: runs `pip download`; any CPython works, the target is fixed below), TORCH_FIND_LINKS
# (where torch's CPU wheel lies when pip's own configuration does not say: a folder, or
# https://download.pytorch.org/whl/cpu/torch/).
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${HIVE_IMAGE_TAG:-local}"
cache="${HIVE_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/hivetrain-images}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
python="${PYTHON:-python3}"
lock=services/requirements.lock
# what the images' base holds: Debian's python3 is 3.11.2, which the lock is resolved for
packages="python3,python3-venv,tini,redis-server,ca-certificates,hostname,procps"
started=$(date +%s)

log() { echo "build-local: $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "$1 is missing: $2"; exit 2; }; }
need docker "apt-get install docker.io (and start dockerd, or set DOCKER_HOST)"
docker info >/dev/null 2>&1 || { log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}): start dockerd"; exit 2; }
mkdir -p "$cache"

# --- 1. the base ----------------------------------------------------------------------------------
base_key=$(printf '%s %s v1' "$packages" "$mirror" | sha256sum | cut -c1-12)
base="hivetrain-base:bookworm-$base_key"
base_tar="$cache/base-$base_key.tar"
if ! docker image inspect "$base" >/dev/null 2>&1; then
    if [ ! -s "$base_tar" ]; then
        need debootstrap "apt-get install debootstrap"
        [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 2; }
        root=$(mktemp -d "$cache/rootfs.XXXXXX")
        trap 'rm -rf "$root"' EXIT
        log "debootstrap bookworm minbase + $packages (about 2 minutes)"
        debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
            || { tail -20 "$cache/debootstrap.log" >&2; log "debootstrap failed (log: $cache/debootstrap.log)"; exit 1; }
        # no caches, logs or machine identity in the image
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
        : >"$root/etc/machine-id"
        tar -C "$root" --numeric-owner -cf "$base_tar.part" . && mv "$base_tar.part" "$base_tar"
        rm -rf "$root"
        trap - EXIT
    fi
    log "importing $base_tar"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh"]' "$base_tar" "$base" >/dev/null
fi
# Redis: the base runs deploy/redis/start.sh (compose mounts it) with Debian's redis-server
docker tag "$base" "hivetrain-redis:$tag"

# --- 2. the wheelhouse ----------------------------------------------------------------------------
lock_key=$(sha256sum "$lock" | cut -c1-12)
wheels="$cache/wheels-$lock_key"
if [ ! -f "$wheels/.complete" ]; then
    rm -rf "$wheels" && mkdir -p "$wheels"
    log "downloading every file of $lock for CPython 3.11 manylinux x86_64 (torch: the CPU wheel)"
    # --require-hashes: what lands here is what the lock names. --no-deps lets pip download for
    # another interpreter and platform without --only-binary: the three hivemind dependencies that
    # PyPI has as sdists only (prefetch-generator, python-baseconv, varint) come as sdists, which
    # pip builds inside the image (offline: setuptools is in the lock); their hashes are PyPI's.
    "$python" -m pip download -q --no-deps --require-hashes --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} -d "$wheels" -r "$lock" 2>&1 | { grep -v "is ignored: it is neither" >&2 || true; }
    touch "$wheels/.complete"
fi

# --- 3. the images --------------------------------------------------------------------------------
# The build context is the repo root; the wheelhouse is put into services/wheels (hard links,
# ignored by git) for the build and emptied after.
stage=services/wheels
trap 'find "$stage" -type f ! -name README.md -delete' EXIT
find "$stage" -type f ! -name README.md -delete
cp -l "$wheels"/* "$stage"/ 2>/dev/null || cp "$wheels"/* "$stage"/
for service in bootstrap validator miner; do
    log "building hivetrain-$service:$tag"
    docker build -q -f services/Dockerfile --target "$service" -t "hivetrain-$service:$tag" \
        --build-arg "BASE_IMAGE=$base" --build-arg WHEELS=/wheels . >/dev/null
done
for image in "hivetrain-redis:$tag" "hivetrain-bootstrap:$tag" "hivetrain-validator:$tag" "hivetrain-miner:$tag"; do
    log "$image $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
done
# the cache keeps the current base and wheelhouse only (an old lock's wheels are 400 MB)
find "$cache" -mindepth 1 -maxdepth 1 \( -name 'base-*.tar' ! -name "base-$base_key.tar" \
    -o -name 'wheels-*' ! -name "wheels-$lock_key" \) -exec rm -rf {} +
log "done in $(( $(date +%s) - started ))s (base $base, wheels $wheels)"
