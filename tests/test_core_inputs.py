"""Unusual inputs reaching the core: refused clearly before any wrong number, and the working budget holds.

One test per case found by fuzzing the public API (raw torch errors and silent results before).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import build

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=7, n=8)
    return model, X, torch.arange(8) % 3


class Centred(nn.Module):
    """Subtracts the batch mean: each output depends on the other inputs of the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


class RandomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(F.dropout(x, 0.5, training=True))


class Cast(nn.Module):
    def __init__(self, to):
        super().__init__()
        self.lin, self.to = nn.Linear(4, 3), to

    def forward(self, x):
        return self.lin(x).to(self.to)


def test_list_of_two_input_batches_is_ambiguous(mlp):
    model, X, _ = mlp
    with pytest.raises(ValueError, match="ambiguous"):
        fl.fisher_trace(model, [X[:4], X[4:]], fl.Categorical())
    # the two readings, spelled out, both work
    a = fl.fisher_trace(model, [(X[:4],), (X[4:],)], fl.Categorical())
    b = fl.fisher_trace(model, (X, None), fl.Categorical())
    assert math.isclose(a, b, rel_tol=1e-12)


def test_list_pair_with_labels_still_a_pair(mlp):
    model, X, y = mlp
    assert math.isclose(fl.fisher_trace(model, [X, y], fl.Categorical(), "empirical"),
                        fl.fisher_trace(model, (X, y), fl.Categorical(), "empirical"), rel_tol=1e-12)


@pytest.mark.parametrize("engine", ["auto", "functional"])
def test_sample_mixing_model_refused(engine):
    model = Centred().double().eval()
    X = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="depends on the other inputs"):
        fl.fisher_trace(model, X, fl.Categorical(), engine=engine)


def test_random_forward_refused():
    model = RandomForward().double().eval()
    with pytest.raises(ValueError, match="different outputs"):
        fl.fisher_diag(model, torch.randn(5, 4, dtype=torch.float64), fl.Categorical())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_inputs_refused(mlp, bad):
    model, X, y = mlp
    X = X.clone()
    X[2, 1] = bad
    for fn in (lambda: fl.fisher_diag(model, (X, y), fl.Categorical()),
               lambda: fl.fisher_rao_norm(model, (X, y), fl.Categorical()),
               lambda: fl.fisher_operator(model, (X, y), fl.Categorical()) @ torch.ones(51)):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn()


def test_integer_outputs_refused():
    model = Cast(torch.int64).double().eval()
    with pytest.raises(TypeError, match="floating point"):
        fl.fisher_trace(model, torch.randn(4, 4, dtype=torch.float64), fl.Categorical())


def test_outputs_of_another_dtype_refused():
    model = Cast(torch.float64).float().eval()
    with pytest.raises(TypeError, match="float64 outputs but its parameters are torch.float32"):
        fl.fisher_trace(model, torch.randn(4, 4), fl.Categorical())


def test_dataloader_without_batching_refused(mlp):
    model, X, y = mlp
    loader = DataLoader(TensorDataset(X, y), batch_size=None)
    with pytest.raises(ValueError, match="batch_size=None"):
        fl.fisher_trace(model, loader, fl.Categorical(), "empirical")


@pytest.mark.parametrize("call", ["diag", "rao", "operator"])
def test_huge_samples_refused_before_allocating(mlp, call):
    model, X, y = mlp
    fn = {
        "diag": lambda: fl.fisher_diag(model, (X, y), fl.Categorical(), "mc", samples=10**9),
        "rao": lambda: fl.fisher_rao_norm(model, (X, y), fl.Categorical(), "mc", samples=10**9),
        "operator": lambda: fl.fisher_operator(model, (X, y), fl.Categorical(), "mc", samples=10**9)
        @ torch.ones(51),
    }[call]
    with pytest.raises(ValueError, match="GiB"):
        fn()


# ----------------------------------------------------------------------------- the working budget
class ResidualCNN(nn.Module):
    """A small ResNet-style network: stem, one residual block, global pooling, head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.c1 = nn.Conv2d(width, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.head(h.mean((2, 3)))


def _peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident memory rises above its current size during ``fn()``."""
    status = Path("/proc/self/status")

    def read(key):
        line = next(x for x in status.read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current size
    base = read("VmRSS")
    fn()
    return read("VmHWM") - base


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_exact_diag_peak_memory_flat_in_n(monkeypatch):
    monkeypatch.setattr(fl._core, "WORK_BUDGET", 8 * 2**20)
    torch.manual_seed(0)
    model = ResidualCNN().float().eval()
    lik = fl.Categorical()
    X = torch.randn(96, 3, 32, 32)
    fl.fisher_diag(model, X[:4], lik)  # warm up: allocator pools, the plan's verification
    peaks = {n: _peak_rss_growth(lambda n=n: fl.fisher_diag(model, X[:n], lik, batch_size=n)) for n in (8, 32, 96)}
    per_input = 10 * 4 * (3 * 16 * 32 * 32)  # ≈ 2 MB of output gradients alone per input (C = 10 columns)
    assert peaks[96] - peaks[8] < 12 * per_input, peaks  # unchunked, 88 more inputs would add > 88 × per_input


def test_float32_overflow_refused_not_returned():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).float().eval()
    X, Y = torch.randn(5, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="overflowed"):
        fl.fisher_diag(model, (X, Y), fl.Gaussian(1e-15), "empirical")
