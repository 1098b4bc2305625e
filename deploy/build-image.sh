#!/usr/bin/env bash
# Build the local CPU flavour of the bentolora OCI image without a Docker daemon or a registry:
#   1. a Debian bookworm base image from debootstrap, imported into buildah (cached);
#   2. the tiny models and the quickstart adapter in the model store;
#   3. `bentoml build` with deploy/bentofile.tiny.yaml (the locked run-time set, bentolora's wheel
#      and the CPU torch wheel);
#   4. `bentoml containerize --backend buildah`, then an OCI archive checked with skopeo.
# Needs root, buildah, debootstrap and skopeo (tools/system-deps.sh installs them). Usage:
#   deploy/build-image.sh [TAG]          (default localhost/bentolora:tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/bentolora:tiny}
BASE_IMAGE=localhost/bentolora-base:bookworm
OUT=${BENTOLORA_IMAGE_OUT:-build/image}
PY=${PY:-.venv/bin/python}
export BUILDAH_ISOLATION=chroot
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start ))s)"; }

# buildah must use the vfs driver (no overlay mounts here), or BentoML's buildah backend looks
# for the base image in another storage and tries to pull it from a registry.
if ! grep -qs 'driver = "vfs"' /etc/containers/storage.conf; then
  mkdir -p /etc/containers
  printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
    > /etc/containers/storage.conf
fi

if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  step "base image: debootstrap bookworm"
  mirror=$(grep -hsoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/* /etc/apt/sources.list | head -n 1 || true)
  rootfs=$(mktemp -d /var/tmp/bentolora-rootfs.XXXX)
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  # Trust what this machine trusts: its package registries may sit behind a TLS proxy with a
  # CA of its own, and the build's `pip install` / `uv pip install` steps go through it.
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
  buildah umount "$ctr"
  # Debian marks its Python as externally managed; BentoML's Dockerfile runs `pip install uv`.
  buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env UV_NATIVE_TLS=1 "$ctr"
  buildah commit -q "$ctr" "$BASE_IMAGE" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm -rf "$rootfs"
fi

step "models in the store"
.venv/bin/bentolora-models build-tiny >/dev/null
.venv/bin/bentolora-models build-tiny-clip >/dev/null
if ! .venv/bin/bentoml models get lora-quickstart >/dev/null 2>&1; then
  "$PY" -m train sample-data data/sample >/dev/null
  "$PY" -m train --config configs/quickstart.yaml --no-tensorboard >/dev/null 2>&1
fi

step "wheels"
rm -rf build/wheels && mkdir -p build/wheels
"$PY" -m pip wheel -q --no-deps -w build/wheels .
torch_pin=$(grep -E '^torch==' requirements/runtime.txt)
"$PY" -m pip download -q --no-deps -d build/wheels "$torch_pin" \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11
torch_wheel=$(cd build/wheels && ls torch-*.whl)
case "$torch_wheel" in *+cpu*) ;; *) echo "not a CPU torch wheel: $torch_wheel" >&2; exit 1 ;; esac
# The locked run-time set, its torch taken from the CPU wheel inside the Bento (BentoML installs
# this file from the Bento's env/python, where ./wheels/ is).
sed "s|^torch==.*|./wheels/$torch_wheel|" requirements/runtime.txt > build/requirements.tiny.txt

step "bentoml build"
bento=$(.venv/bin/bentoml build -f deploy/bentofile.tiny.yaml --output tag . | tail -n 1 | sed 's/^__tag__://')
echo "bento: $bento"

step "bentoml containerize (buildah)"
.venv/bin/bentoml containerize "$bento" --backend buildah -t "$TAG"

step "OCI archive"
mkdir -p "$OUT"
rm -f "$OUT/bentolora-tiny.oci.tar"
buildah push -q "$TAG" "oci-archive:$OUT/bentolora-tiny.oci.tar:$TAG"
skopeo inspect --config "oci-archive:$OUT/bentolora-tiny.oci.tar" > "$OUT/config.json"
skopeo inspect "oci-archive:$OUT/bentolora-tiny.oci.tar" > "$OUT/inspect.json"
step "done: $TAG, $(du -h "$OUT/bentolora-tiny.oci.tar" | cut -f1) archive"
