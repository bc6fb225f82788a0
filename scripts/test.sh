#!/usr/bin/env bash
# The README's test command: set-up, then the whole test suite.
#
#   ./scripts/test.sh [PYTEST ARGS]           the locked versions (requirements.lock), as CI:
#                                             installs with scripts/setup.sh (into .venv unless a
#                                             virtual environment is active), runs the suite there
#   ./scripts/test.sh --latest [PYTEST ARGS]  a new .venv-latest (the old one deleted) with the
#                                             newest releases that pyproject.toml's ranges allow,
#                                             no lock; the suite runs there. Not in CI: run it
#                                             before a release and after scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --latest ]; then
  shift
  rm -rf .venv-latest
  env -u VIRTUAL_ENV "${PYTHON:-python3}" -m venv .venv-latest
  ./scripts/setup.sh --latest --venv .venv-latest
  py="$PWD/.venv-latest/bin/python"
else
  ./scripts/setup.sh
  py="$(./scripts/setup.sh --venv-only)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$py" - <<'PY'
import sys
from importlib.metadata import version
names = ["torch", "torchvision", "timm", "transformers", "numpy", "pytest", "hypothesis"]
print(f"test.sh: {sys.prefix}, Python {sys.version.split()[0]},", ", ".join(f"{n} {version(n)}" for n in names))
PY
"$py" -m pytest -q -p no:cacheprovider "$@"
