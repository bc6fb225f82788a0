#!/usr/bin/env bash
# Installs what ecmt needs on a fresh Debian machine: the Fashion-MNIST files (Debian package)
# and the Python package with its dependencies. Safe to run again; it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m pip install -q -e ".[test]"
