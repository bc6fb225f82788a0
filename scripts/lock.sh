#!/usr/bin/env bash
# Refreshes requirements.lock: builds a new virtual environment (.venv-lock) from nothing,
# installs the newest releases that pyproject.toml's ranges allow (scripts/setup.sh --latest,
# test tools and the llm extra included), and writes `pip freeze` of it, every direct and
# indirect dependency with its exact version (setuptools included: torch needs it), ecmt itself,
# pip and requirements-models.txt left out.
# Then run the suite on the new lock: ./scripts/test.sh (README, "Testing").
set -euo pipefail
cd "$(dirname "$0")/.."
unset VIRTUAL_ENV PYTHONPATH
rm -rf .venv-lock
"${PYTHON:-python3}" -m venv .venv-lock
./scripts/setup.sh --latest --venv .venv-lock
.venv-lock/bin/python - <<'PY' > requirements.lock.new
import platform, re, subprocess, sys, time

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
skip = {"ecmt", "pip"} | {norm(line.split("==")[0]) for line in open("requirements-models.txt")
                   if line.strip() and not line.startswith("#")}
frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                        check=True, capture_output=True, text=True).stdout.splitlines()
print("# Exact versions of every direct and indirect dependency of ecmt[test,llm] that the suite")
print("# was run with; scripts/setup.sh installs from this file. Written by scripts/lock.sh (do not")
print(f"# edit by hand) on {time.strftime('%Y-%m-%d', time.gmtime())}, CPython {platform.python_version()},"
      f" {platform.system()} {platform.machine()}.")
for line in frozen:
    if line.startswith("#") or not line.strip():
        continue
    if norm(re.split(r"[=@ ]", line, maxsplit=1)[0]) not in skip:
        print(line)
PY
mv requirements.lock.new requirements.lock
echo "lock.sh: wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages); now run ./scripts/test.sh"
