"""The built wheel ships kernels/*.cu and the installed loader finds them.

Builds the wheel from a copy of the source tree (so no build/ or *.egg-info
lands in the checkout), installs it into a fresh venv that sees the system
site-packages (for numpy), and runs a subprocess there -- outside the
repository, with no PYTHONPATH -- that imports gpucnn.cuda.loader and lists
the sources.  About 10 s.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from gpucnn.cuda import loader

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys
import gpucnn, gpucnn.cuda.loader as loader
sources = loader.list_sources()
print(json.dumps({
    "gpucnn": gpucnn.__file__,
    "kernel_dir": str(loader.kernel_dir()),
    "sources": {name: str(path) for name, path in sources.items()},
    "first_lines": {name: loader.read_source(name).splitlines()[0] for name in sources},
    "kernels": sorted(k for names in loader.KERNEL_FILES.values() for k in names
                      if loader.kernel_signature(k)),
    "prefix": sys.prefix,
}))
"""


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in ("gpucnn", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    if not (src / "README.md").exists():  # pyproject names it as the readme
        (src / "README.md").write_text("gpucnn\n")
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(out), str(src)])
    wheels = list(out.glob("gpucnn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_every_package_and_the_shipped_data(wheel):
    """Every package of the source tree (an explicit list in pyproject.toml) and the shipped MNIST."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in sorted((REPO / "gpucnn").rglob("__init__.py")):
        rel = init.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml"
    for gz in sorted((REPO / "gpucnn" / "_data").rglob("*.gz")):
        assert gz.relative_to(REPO).as_posix() in names


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for filename in loader.KERNEL_FILES:
        assert f"gpucnn/kernels/{filename}" in names, sorted(names)
    for module in ("gpucnn/cuda/__init__.py", "gpucnn/cuda/loader.py", "gpucnn/cuda/conv.py",
                   "gpucnn/kernels/__init__.py"):
        assert module in names


def test_installed_wheel_locates_kernels(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = _run([str(python), "-c", PROBE], cwd=tmp_path, env=env).stdout
    info = json.loads(out.strip().splitlines()[-1])

    site = Path(info["prefix"]).resolve()
    assert Path(info["gpucnn"]).resolve().is_relative_to(site), info   # the wheel, not the checkout
    kernel_dir = Path(info["kernel_dir"]).resolve()
    assert kernel_dir.is_relative_to(site) and kernel_dir.name == "kernels", info
    assert sorted(info["sources"]) == sorted(loader.KERNEL_FILES)
    for name, path in info["sources"].items():
        assert Path(path).is_file() and Path(path).parent.resolve() == kernel_dir
        assert info["first_lines"][name] == f'#line 1 "kernels/{name}"'
    expected = sorted(k for names in loader.KERNEL_FILES.values() for k in names)
    assert info["kernels"] == expected
