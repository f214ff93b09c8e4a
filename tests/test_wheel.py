"""The release artefacts: ``python -m build`` makes an sdist and a wheel holding what they must, and the wheel,
installed into a fresh virtual environment with only its runtime dependencies, runs the main job and the API.

Needs the package index (the build backend and the runtime dependencies are installed from it; torch from the
local CPU wheel when pip has one); deselect offline with ``-m 'not wheel'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import fisherlens

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def _run(*cmd, **kw) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200, **kw)
    what = " ".join(map(str, cmd))
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


def _only(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def test_wheel_contents_and_metadata(dist):
    whl = _only(dist, f"fisherlens-{fisherlens.__version__}-py3-none-any.whl")
    names = zipfile.ZipFile(whl).namelist()
    info = f"fisherlens-{fisherlens.__version__}.dist-info"
    for need in ("fisherlens/__init__.py", "fisherlens/data/mnist5000.npz", "fisherlens/py.typed",
                 "fisherlens/integrations/lightning.py", "fisherlens/experiments/demo.py",
                 f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"):
        assert need in names, need
    assert not [n for n in names if n.endswith(".png") or n.startswith(("tests/", "docs/", "benchmarks/"))]
    meta = Parser().parsestr(zipfile.ZipFile(whl).read(f"{info}/METADATA").decode())
    assert meta["Version"] == fisherlens.__version__
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.4" in requires
    runtime = [r for r in requires if "extra ==" not in r]
    assert {r.split(">")[0].split("=")[0] for r in runtime} == {"torch", "numpy", "scipy", "matplotlib", "tqdm",
                                                                 "mpmath", "threadpoolctl"}
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Intended Audience :: Science/Research" in classifiers
    assert {"dev", "lightning", "hf", "tensorboard", "data"} <= set(meta.get_all("Provides-Extra"))


def test_sdist_contents(dist):
    sdist = _only(dist, f"fisherlens-{fisherlens.__version__}.tar.gz")
    top = f"fisherlens-{fisherlens.__version__}/"
    names = {n.removeprefix(top) for n in tarfile.open(sdist).getnames()}
    for need in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "src/fisherlens/data/mnist5000.npz",
                 "src/fisherlens/py.typed", "tests/conftest.py", "tests/reference.py", "tests/test_fisher.py",
                 "tests/helpers.py", "docs/conventions.md", "examples/exact_fisher.py"):
        assert need in names, need
    assert not [n for n in names if n.endswith(".png") or n.startswith("benchmarks/")]


@pytest.mark.skipif(os.environ.get("FISHERLENS_SKIP_FRESH_VENV") == "1", reason="FISHERLENS_SKIP_FRESH_VENV=1")
def test_wheel_in_a_fresh_venv_runs_the_main_job(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the CPU build first (as the README says), so that torch>=2.4 does not pull a CUDA build
    _run(py, "-m", "pip", "install", "-q", "torch==2.13.0", env=env)
    _run(py, "-m", "pip", "install", "-q", _only(dist, "*.whl"), env=env)
    absent = _run(py, "-c", "import importlib.util as u; print([m for m in ('sklearn', 'mlxtend', 'transformers', "
                  "'lightning', 'tensorboard', 'pytest') if u.find_spec(m)])", env=env)
    assert absent.strip() == "[]", f"the runtime install pulled optional packages: {absent}"
    out = tmp_path / "demo"
    _run(env_dir / "bin" / "fisherlens", "run", "demo", "--quick", "--no-progress", "--out", out, env=env,
         cwd=tmp_path)
    assert (out / "summary.md").is_file() and (out / "metrics.csv").is_file() and list(out.glob("*.png"))
    api = _run(py, "-c", "import torch, fisherlens as fl; from fisherlens.datasets import mnist_subset; "
               "X, y = mnist_subset(); X, y = X[:64].double(), y[:64]; torch.manual_seed(0); "
               "m = torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double(); "
               "F = fl.fisher_matrix(m, (X, y), fl.Categorical()); "
               "print(len(X), float(F.trace()), fl.fisher_trace(m, (X, y), fl.Categorical()), fl.__version__)",
               env=env, cwd=tmp_path)
    n, tr_dense, tr, version = api.split()
    assert n == "64" and version == fisherlens.__version__
    assert abs(float(tr_dense) - float(tr)) <= 1e-10 * abs(float(tr))
    for module, says in (("lightning", "needs PyTorch Lightning"), ("transformers", "needs Hugging Face")):
        with pytest.raises(AssertionError, match=says):  # a clear error without the framework
            _run(py, "-c", f"import fisherlens.integrations.{module}", env=env)
