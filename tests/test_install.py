"""Packaging: what pip's isolated build sees and what an install without a prebuilt extension does.

- pyproject.toml: no torch among the build requirements (pip's isolated build env would resolve
  it to the newest CUDA build), triton only in extras, ninja (the JIT build's driver) at run time;
- setup.py: with torch not importable it declares no extension, and its build still ships the
  C++ sources inside the package (crh_kernels/_csrc) for the JIT build;
- that pure-Python build JIT-builds the extension at first use, saying so, and loads it from
  torch's cache in the next process without the message; the JIT build finds ninja also when
  the venv is not activated.

The whole pip round trip (clean venv, torch pinned, `pip install .` with isolation, pip's logs)
is .ci/install_check.sh, run by .ci/run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1).lower().replace("_", "-")


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_no_torch_in_build_requirements(pyproject):
    names = [_name(r) for r in pyproject["build-system"]["requires"]]
    assert "setuptools" in names
    assert "torch" not in names, names


def test_triton_only_in_extras(pyproject):
    project = pyproject["project"]
    runtime = [_name(r) for r in project["dependencies"]]
    extras = {k: [_name(r) for r in v] for k, v in project["optional-dependencies"].items()}
    assert "triton" not in runtime, runtime
    assert "triton" in extras["triton"] and "triton" in extras["test"], extras
    # the JIT build (an install without --no-build-isolation) needs ninja on every install
    assert "ninja" in runtime and "torch" in runtime, runtime


_SETUP_EXTENSIONS = r"""
import importlib.util, json, sys
if sys.argv[1] == "blocked":
    sys.modules["torch"] = None          # `import torch` raises ImportError, as in pip's build env
spec = importlib.util.spec_from_file_location("crh_setup", sys.argv[2])
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)        # not __main__: defines, does not call setup()
ext_modules, cmdclass = setup_py.extensions()
print(json.dumps([[e.name for e in ext_modules], sorted(cmdclass)]))
"""


def _extensions(torch_state: str):
    env = {**os.environ, "CRH_SKIP_CUDA_BUILD": "1"}
    out = subprocess.run([sys.executable, "-c", _SETUP_EXTENSIONS, torch_state, str(ROOT / "setup.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_setup_without_torch_declares_no_extension():
    (names, cmds), err = _extensions("blocked")
    assert names == [] and cmds == [], (names, cmds)
    assert "torch is not importable" in err and "JIT-built at first use" in err, err


def test_setup_with_torch_declares_the_cpu_extension():
    (names, cmds), _ = _extensions("importable")
    assert names == ["crh_kernels._C"] and cmds == ["build_ext"], (names, cmds)


def _copy_source_tree(dest: Path) -> None:
    """What an sdist holds (MANIFEST.in grafts csrc/), without the in-tree build products."""
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "_csrc")
    shutil.copytree(ROOT / "crh_kernels", dest / "crh_kernels", ignore=skip)
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=skip)


@pytest.fixture(scope="module")
def pure_build(tmp_path_factory):
    """setup.py's build of the Python package as pip's isolated build env runs it (torch not
    importable): the tree a wheel is made of."""
    src = tmp_path_factory.mktemp("src")
    _copy_source_tree(src)
    lib = tmp_path_factory.mktemp("lib")
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', '-q', 'build', '--build-base', {str(src / 'build')!r}, "
            f"'--build-lib', {str(lib)!r}]; runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return lib


def test_pure_build_ships_the_sources_and_no_binary(pure_build):
    from crh_kernels import _build

    pkg = pure_build / "crh_kernels"
    assert (pkg / "__init__.py").is_file() and (pkg / "_build.py").is_file()
    assert not list(pkg.rglob("*.so")), list(pkg.rglob("*.so"))
    listed = {*_build.CPU_SOURCES, *_build.CPU_HEADERS, *_build.CUDA_SOURCES, *_build.CUDA_HEADERS}
    shipped = {p.name for p in (pkg / "_csrc").iterdir()}
    assert shipped == listed, shipped ^ listed
    for name in listed:  # the checkout's files, unchanged
        assert (pkg / "_csrc" / name).read_bytes() == (ROOT / "csrc" / name).read_bytes(), name


_FIRST_USE = r"""
import os, sys, importlib.util
# a checkout's editable install adds an import finder that would resolve crh_kernels._C to the
# checkout's in-tree build; a real install has none
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import torch, crh_kernels
from crh_kernels.backends.cpp import load_extension

assert crh_kernels.__file__.startswith(sys.argv[1]), crh_kernels.__file__
assert importlib.util.find_spec("crh_kernels._C") is None
mod, how = load_extension("cpu")
assert mod is not None, how
torch.manual_seed(0)
x = torch.randn(200, 11)
x[3] = 0.0                                   # a zero row: skipped, counted
m = crh_kernels.Moments(11, backend="cpp").update(x)
u = x[torch.arange(200) != 3].double()
u = u / u.norm(dim=1, keepdim=True)          # float64 reference: unit rows, population covariance
err = (m.cov().double() - torch.cov(u.T, correction=0)).abs().max().item()
print(how, int(m.n), int(m.n_skipped), f"{err:.3g}", crh_kernels._build.CSRC)
"""


@pytest.mark.slow
def test_jit_build_at_first_use_message_only_when_building(pure_build, tmp_path):
    """The pure-Python install JIT-builds the extension from its shipped sources at first use
    (message), and the next process loads torch's cached build (no message): ninja, asked
    with a dry run, has nothing to do."""
    env = {k: v for k, v in os.environ.items() if k not in ("CRH_BACKEND", "CRH_CPU_ISA")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CRH_REQUIRE_CPP="1",
               PYTHONPATH=os.pathsep.join([str(pure_build), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _FIRST_USE, str(pure_build)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(out)
    for out in runs:
        how, n, skipped, err, csrc = out.stdout.split()
        assert how == "JIT-built" and (int(n), int(skipped)) == (199, 1), out.stdout
        assert float(err) < 1e-5, err
        assert Path(csrc) == pure_build / "crh_kernels" / "_csrc", csrc
    assert "JIT-building it from" in runs[0].stderr, runs[0].stderr
    assert "JIT-building" not in runs[1].stderr, runs[1].stderr


def test_ninja_found_without_an_activated_venv(monkeypatch, tmp_path):
    """torch runs `ninja` from PATH; a venv's python run by its path (venv not activated) has
    the ninja dependency next to it but not on PATH. The JIT build puts it there."""
    from crh_kernels import _build

    monkeypatch.setenv("PATH", str(tmp_path))           # an empty folder: no ninja, no shims
    assert shutil.which("ninja") is None
    _build._ninja_on_path()
    found = shutil.which("ninja")
    assert found is not None
    assert subprocess.run([found, "--version"], capture_output=True, timeout=30).returncode == 0
