#!/usr/bin/env bash
# The README's test command: set-up, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -p no:cacheprovider "$@"
