"""scripts/setup.sh picks where to install: into the active virtual environment, else into a new
`.venv` in the checkout, never into a system Python. Debian's python3 is externally managed
(PEP 668: a marker file EXTERNALLY-MANAGED in its standard library makes `pip install` refuse).
No Debian machine here, so `system_python` makes one: a copy of this interpreter's executable
with its own prefix (the standard library linked in, empty site-packages) and the marker. A venv
will not do: pip ignores the marker inside virtual environments. `--venv-only` stops setup.sh
once the environment is chosen or created; the full install was run once by hand (README)."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED_PIP = next((Path(sysconfig.get_path("stdlib")) / "ensurepip" / "_bundled").glob("pip-*.whl"), None)
pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("bash") is None
                                or BUNDLED_PIP is None, reason="setup.sh is a bash script for Linux")


@pytest.fixture(scope="module")
def system_python(tmp_path_factory):
    root = tmp_path_factory.mktemp("debian-python")
    stdlib = Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix,
                                                     "base": sys.base_prefix}))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (root / "bin").mkdir()
    exe = root / "bin" / version
    shutil.copy2(os.path.realpath(sys.executable), exe)  # a copy: a link would resolve home
    (root / "bin" / "python3").symlink_to(version)
    lib = root / "lib" / version
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    (lib / "site-packages").mkdir()
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=Use a virtual environment.\n")
    probe = subprocess.run([str(exe), "-c", "import sys, sysconfig; print(sys.prefix == sys.base_prefix,"
                            " sysconfig.get_path('stdlib'))"], capture_output=True, text=True)
    if probe.returncode or probe.stdout.split() != ["True", str(lib)]:
        pytest.skip(f"this interpreter cannot be relocated: {probe.stdout} {probe.stderr}")
    return exe


def checkout(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    return tmp_path


def run_setup(repo, python_dir, *args, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in {"VIRTUAL_ENV", "PYTHON", "ECMT_VENV", "PYTHONPATH", "PYTHONHOME"}}
    base["PATH"] = f"{python_dir}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *args], env=base | env,
                          capture_output=True, text=True, timeout=300)


def pip_dry_run(python):
    """`pip install` (dry run, nothing downloaded) of the bundled pip wheel, with the pip that the
    standard library bundles (the copy has no pip of its own)."""
    return subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                           str(BUNDLED_PIP)], env=os.environ | {"PYTHONPATH": str(BUNDLED_PIP)},
                          capture_output=True, text=True, timeout=120)


def test_the_copy_is_externally_managed(system_python):
    refused = pip_dry_run(system_python)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr + refused.stdout


def test_outside_a_venv_setup_creates_dot_venv_and_installs_there(system_python, tmp_path):
    repo = checkout(tmp_path)
    done = run_setup(repo, system_python.parent, "--venv-only")
    assert done.returncode == 0, done.stderr
    venv = repo / ".venv"
    assert done.stdout.strip().splitlines()[-1] == str(venv / "bin" / "python")
    cfg = (venv / "pyvenv.cfg").read_text()
    assert f"home = {system_python.parent}" in cfg and "include-system-site-packages = false" in cfg
    # pip accepts to install into the new venv, where it refused in the system Python
    allowed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run",
                              "--force-reinstall", "--no-index", "--no-deps", "--disable-pip-version-check",
                              str(BUNDLED_PIP)], capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "Would install pip" in allowed.stdout, allowed.stderr
    # a second run reuses it
    again = run_setup(repo, system_python.parent, "--venv-only")
    assert again.returncode == 0 and "creating" not in again.stdout
    assert again.stdout.strip() == str(venv / "bin" / "python")


def test_inside_a_venv_setup_installs_there(system_python, tmp_path):
    repo = checkout(tmp_path / "repo")
    user = tmp_path / "user-venv"
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(user)], check=True)
    activated = run_setup(repo, user / "bin", "--venv-only", VIRTUAL_ENV=str(user))
    on_path = run_setup(repo, user / "bin", "--venv-only")  # its python3 first on PATH, not activated
    for done in (activated, on_path):
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()).parent == user / "bin"
    assert not (repo / ".venv").exists()


def test_venv_option_wins(system_python, tmp_path):
    repo = checkout(tmp_path)
    done = run_setup(repo, system_python.parent, "--venv-only", "--venv", "env2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(repo / "env2" / "bin" / "python")
    assert not (repo / ".venv").exists()
