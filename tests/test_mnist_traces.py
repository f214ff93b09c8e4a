"""The MNIST trace study (``fisherlens run mnist-traces``, seed 000 §5.1.1): traces against a naive float64
reference, the statistics, resume after an injected crash and after ``kill -9`` with identical metrics, refusal of a
folder of another configuration, and the IDX-folder data path."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx

from fisherlens import runs
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS
from fisherlens.experiments import mnist_traces as mt
from fisherlens.experiments._common import make_mlp

pytestmark = pytest.mark.study

SRC = Path(__file__).resolve().parents[1] / "src"
#: a reduced quick run for the in-process tests (12 units of 16 steps)
SMALL = dict(widths=(8, 16), losses=("l2_norm", "mean_power4", "cross_entropy"), seeds=2)
SMALL_CLI = ["--set", "widths=(8, 16)", "--set", "losses=('l2_norm', 'mean_power4', 'cross_entropy')",
             "--set", "seeds=2"]


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory):
    """An unbroken reduced quick run (no figures), the reference for the resume tests."""
    return mt.mnist_traces(tmp_path_factory.mktemp("ref") / "run", quick=True, progress=False, figures=False, **SMALL)


def _setup(n=40, d=6, C=3, epochs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n + 10, d, generator=g)
    y = torch.randint(0, C, (n + 10,), generator=g)
    return mt.Setup(X[:n], y[:n], X[n:], y[n:], (X[:12], y[:12]), C, epochs, batch_size=8, lr=1e-2,
                    measure_per_epoch=2, seed=seed)


def _naive(model, X, y, loss_fn):
    """tr F_emp, (1/N) tr Θ and (1/N) Σ r Θ_nn r by a float64 loop over samples and outputs (torch.autograd)."""
    md = copy.deepcopy(model).double()
    ps = list(md.parameters())
    trF = trT = side = 0.0
    for i in range(len(X)):
        f = md(X[i : i + 1].double())
        J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[0, a], ps, retain_graph=True)])
                         for a in range(f.shape[1])])  # (C, P)
        fl_ = f.detach().requires_grad_(True)
        (r,) = torch.autograd.grad(loss_fn(fl_, y[i : i + 1]).sum(), fl_)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(f, y[i : i + 1]).sum(), ps)])
        trF += g.square().sum().item()
        trT += J.square().sum().item()
        side += (r[0] @ (J @ J.T) @ r[0]).item()
    n = len(X)
    return trF / n, trT / n, side / n


@pytest.mark.parametrize("key", list(mt.LOSSES))
def test_traces_match_naive_reference(key):
    setup = _setup()
    rows, model = mt.train_unit(setup, key, 5, 0)
    assert [r["step"] for r in rows] == setup.record_steps() == [0, 2, 5, 7, 10]
    last = rows[-1]
    X, y = setup.probe
    trF, trT, side = _naive(model, X, y, mt.LOSSES[key].make())
    assert math.isclose(last["fisher_trace"], trF, rel_tol=2e-5)
    assert math.isclose(last["ntk_trace"], trT, rel_tol=2e-5)
    assert math.isclose(last["ntk_side"], side, rel_tol=2e-5)
    assert math.isclose(last["trace_ratio"], trF / trT, rel_tol=5e-5)
    with torch.no_grad():
        f = model(X)
        assert math.isclose(last["probe_loss"], mt.LOSSES[key].make()(f, y).mean().item(), rel_tol=1e-6)
        assert last["probe_accuracy"] == (f.argmax(-1) == y).double().mean().item()
        assert last["test_accuracy"] == (model(setup.Xte).argmax(-1) == setup.yte).double().mean().item()
    assert rows[0]["fisher_trace"] != last["fisher_trace"]  # it trained


def test_train_unit_resumes_from_any_epoch_checkpoint():
    setup = _setup(epochs=3)
    saved = []
    ref, m_ref = mt.train_unit(setup, "mean_power2", 7, 1, save=lambda s: saved.append(copy.deepcopy(s)))
    assert [s["epoch"] for s in saved] == [1, 2, 3]
    for s in saved[:2]:
        rows, m = mt.train_unit(setup, "mean_power2", 7, 1, state=s)
        assert rows == ref
        for a, b in zip(m.parameters(), m_ref.parameters(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not belong"):
        mt.train_unit(setup, "l2_norm", 7, 1, state=saved[0])


def test_make_mlp_seeded_without_global_rng():
    before = torch.get_rng_state()
    a = make_mlp(784, (16, 16), 10, generator=torch.Generator().manual_seed(5))
    b = make_mlp(784, (16, 16), 10, generator=torch.Generator().manual_seed(5))
    c = make_mlp(784, (16, 16), 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), before)
    assert [n for n, _ in a.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                    "out.weight", "out.bias"]
    for (_, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q) and not torch.equal(p, r)
    w = a.fc1.weight
    assert w.abs().max() <= 1 / math.sqrt(784) and w.std() > 0.5 / math.sqrt(3 * 784)  # U(-1/√fan_in, 1/√fan_in)


def test_trace_fit():
    rng = np.random.default_rng(0)
    T = rng.uniform(1, 5, 30)
    s = mt.trace_fit(0.3 * T, T)
    assert s["pearson"] == pytest.approx(1) and s["ratio"] == pytest.approx(0.3)
    assert s["residual"] == pytest.approx(0, abs=1e-14) and s["ratio_span"] == pytest.approx(1)
    F = rng.uniform(1, 5, 30)
    s = mt.trace_fit(F, T)
    c = np.linalg.lstsq(T[:, None], F, rcond=None)[0][0]
    assert s["pearson"] == pytest.approx(np.corrcoef(F, T)[0, 1])
    assert s["ratio"] == pytest.approx(c)
    assert s["residual"] == pytest.approx(np.linalg.norm(F - c * T) / np.linalg.norm(F))
    assert s["ratio_span"] == pytest.approx((F / T).max() / (F / T).min())
    assert math.isnan(mt.trace_fit([1.0, 1.0], [1.0, 2.0])["pearson"])
    with pytest.raises(ValueError, match="equal length"):
        mt.trace_fit([1.0, 2.0], [1.0])


def _crash_after(n_saves):
    calls = {"n": 0}
    orig = runs.Units.save

    def save(self, key, state):
        orig(self, key, state)
        calls["n"] += 1
        if calls["n"] == n_saves:
            raise RuntimeError("injected crash after a checkpoint")

    return save


def test_resume_after_injected_crash_identical_metrics(tmp_path, monkeypatch, small_ref):
    ref = small_ref
    out = tmp_path / "run"
    monkeypatch.setattr(runs.Units, "save", _crash_after(13))  # inside the 7th unit, after its first epoch
    with pytest.raises(RuntimeError, match="injected"):
        mt.mnist_traces(out, quick=True, progress=False, figures=False, **SMALL)
    monkeypatch.undo()
    done = sorted(p.name for p in (out / "units").glob("*.json"))
    assert len(done) == 6 and len(list((out / "units").glob("*.ckpt.pt"))) == 1
    assert len(runs.read_csv(out / "metrics.csv")) == 6 * 5  # finished units only, no partial rows
    assert not (out / "summary.md").exists()
    mt.mnist_traces(out, quick=True, progress=False, **SMALL)
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert "1 of them resumed" in (out / "summary.md").read_text()
    assert list((out / "units").glob("*.ckpt.pt")) == []
    for name in ("mnist_traces_w8_order2.png", "mnist_traces_w16_order4.png", "mnist_traces_ratio.png",
                 "mnist_traces_accuracy.png", "mnist_traces_residual.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "mnist_traces_w8_order6.png").exists()  # no order-6 loss in this run
    rows = runs.read_csv(out / "metrics.csv")
    assert len(rows) == 12 * 5 and tuple(rows[0]) == mt.COLUMNS
    summary = (out / "summary.md").read_text()
    assert "| L2-norm | 8 |" in summary and "Seed's finding" in summary and "Eq 5.1.2 check" in summary
    # a rerun of the finished folder reads everything back and changes nothing
    mt.mnist_traces(out, quick=True, progress=False, figures=False, **SMALL)
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert "0 of 12 units computed" in (out / "summary.md").read_text()


def test_refuses_folder_of_another_config(tmp_path, capsys):
    out = tmp_path / "run"
    small = dict(SMALL, widths=(8,), losses=("l2_norm",), seeds=1)
    mt.mnist_traces(out, quick=True, progress=False, figures=False, **small)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"different config \(differs in: seed\)"):
        mt.mnist_traces(out, quick=True, seed=1, progress=False, **small)
    with pytest.raises(ValueError, match="differs in: epochs"):
        mt.mnist_traces(out, quick=True, epochs=3, progress=False, **small)
    assert main(["run", "mnist-traces", "--quick", "--out", str(out), "--no-progress", "--set", "seeds=1"]) == 2
    assert "different config" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_kill_9_and_rerun_gives_identical_metrics(tmp_path, small_ref):
    """SIGKILL the command line run once a unit has finished and another has checkpointed; rerunning the same
    command resumes and ends with metrics.csv byte-identical to an unbroken run (figures: see the test above)."""
    ref = small_ref
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fisherlens.cli", "run", "mnist-traces", "--quick", "--out", str(out),
           "--no-progress", *SMALL_CLI, "--set", "figures=False"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    units = out / "units"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if units.is_dir() and list(units.glob("*.json")) and list(units.glob("*.ckpt.pt")):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.md").exists()
    n_done = len(list(units.glob("*.json")))
    assert 1 <= n_done < 12
    if (out / "metrics.csv").exists():  # rows of finished units only: whole units, never a partial one
        rows = runs.read_csv(out / "metrics.csv")
        assert len(rows) % 5 == 0 and len(rows) <= 5 * n_done
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert (out / "summary.md").is_file()


def _idx_folder(path, n_train=30, n_test=12):
    rng = np.random.default_rng(2)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def test_idx_folder_data(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    _idx_folder(d)
    desc, Xtr, ytr, Xte, yte = mt.load_data(str(d), None, None, seed=0)
    assert Xtr.shape == (30, 784) and Xte.shape == (12, 784) and "IDX" in desc
    assert torch.equal(yte, torch.arange(12) % 10)  # the t10k split is the test set, in file order
    _, Xs, ys, _, _ = mt.load_data(str(d), 20, 5, seed=0)
    assert Xs.shape == (20, 784) and len(set(ys.tolist())) == 10
    out = mt.mnist_traces(tmp_path / "run", data=str(d), n_train=None, n_test=None, n_probe=8, epochs=1,
                          widths=(4,), losses=("cross_entropy",), seeds=1, batch_size=10, progress=False,
                          figures=False)
    rows = runs.read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    assert json.loads((out / "config.json").read_text())["data"] == str(d)
    (d / "t10k-images-idx3-ubyte").unlink()
    (d / "t10k-labels-idx1-ubyte").unlink()
    _, Xtr, _, Xte, _ = mt.load_data(str(d), None, 6, seed=0)  # no test files: held out from the train split
    assert len(Xtr) == 24 and len(Xte) == 6


def test_bad_options_and_registry(tmp_path):
    assert "mnist-traces" in EXPERIMENTS
    for kw, match in ((dict(losses=("l3_norm",)), "unknown or repeated losses"), (dict(widths=(8, 8)), "distinct"),
                      (dict(batch_size=0), "batch_size"), (dict(epochs=1.5), "epochs"), (dict(lr=-1.0), "lr"),
                      (dict(n_train=0), "n_train")):
        with pytest.raises(ValueError, match=match):
            mt.mnist_traces(tmp_path / "bad", quick=True, progress=False, **kw)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="Unknown dataset"):
        mt.mnist_traces(tmp_path / "bad", quick=True, progress=False, data=str(tmp_path / "nowhere"))
    assert not (tmp_path / "bad").exists()
