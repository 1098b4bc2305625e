#!/usr/bin/env bash
# The Debian packages some tests need, and the one place that lists them:
#   chromium, fonts-dejavu-core      tests/test_ui.py (the web UI in a headless browser)
#   buildah, debootstrap, skopeo     tests/test_image.py (builds and runs the OCI image)
# As root with apt-get: installs what is missing. Otherwise: one line naming what is missing and
# the command that installs it; the tests that need a missing package are skipped (CI=true makes
# them fail instead). `make test` runs this first.
set -euo pipefail
declare -A tool_package=(
  [chromium]=chromium [buildah]=buildah [debootstrap]=debootstrap [skopeo]=skopeo
)
missing=()
for tool in chromium buildah debootstrap skopeo; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${tool_package[$tool]}")
done
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system packages: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "system packages missing: ${missing[*]} (install: sudo apt-get install -y ${missing[*]});" \
    "the UI browser tests and the image test are skipped without them"
fi
