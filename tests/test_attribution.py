"""Per-sample attribution that cannot be fooled, models vmap cannot batch, fused attention kernels.

Every exact view is compared in float64 with the slow reference (``reference.py``: one ``autograd.grad`` per
sample and output) on models whose layers see sequence-first inputs, on RNNs and on transformers in eval mode.
"""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from helpers import assert_close
from torch import nn

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")


class Transposed(nn.Module):
    """A Linear applied to ``x.transpose(0, 1)``: its input is ``(T, B, I)``, the batch on axis 1."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


class SeqFirstEncoder(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=False)`` on ``(T, B, E)``."""

    def __init__(self, batch_first: bool = False, layers: int = 1):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.batch_first:
            return self.head(self.enc(x).mean(1))
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def model_and_data(name: str, n: int, seq: int):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    make = {
        "transposed": (Transposed, (seq, 8)),
        "encoder_seq_first": (SeqFirstEncoder, (seq, 8)),
        "encoder_fused": (lambda: SeqFirstEncoder(batch_first=True, layers=2), (seq, 8)),
        "rnn": (lambda: Recurrent(nn.RNN), (seq, 3)),
        "lstm": (lambda: Recurrent(nn.LSTM), (seq, 3)),
        "gru": (lambda: Recurrent(nn.GRU), (seq, 3)),
    }[name]
    model = make[0]().double().eval()
    X = torch.randn(n, *make[1], generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, X, y


# (name, N, T): T equal to the verification batch (4), to N, and different from both
CASES = [("transposed", 8, 4), ("transposed", 8, 8), ("transposed", 6, 5), ("transposed", 4, 4),
         ("encoder_seq_first", 8, 4), ("encoder_seq_first", 5, 5), ("encoder_seq_first", 6, 3),
         ("encoder_fused", 5, 4), ("rnn", 5, 4), ("lstm", 5, 4), ("gru", 4, 5)]
IDS = [f"{n}-N{b}-T{t}" for n, b, t in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return model_and_data(*request.param)


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_every_exact_view_against_reference(case, kind):
    model, X, y = case
    spec = ("categorical",)
    J = ref.jacobians(model, X)
    F_ref = ref.fisher(model, X, y, spec, kind)
    lik = fl.Categorical()
    data = (X, y)
    assert_close(quiet(fl.fisher_matrix, model, data, lik, kind), F_ref, what="matrix")
    assert_close(quiet(fl.fisher_diag, model, data, lik, kind), F_ref.diagonal(), what="diag")
    assert_close(quiet(fl.fisher_trace, model, data, lik, kind), F_ref.trace(), what="trace")
    blocks = quiet(fl.fisher_blocks, model, data, lik, kind, "dense")
    sl = ref.slices(model)
    for n, B in blocks.items():
        assert_close(B, F_ref[sl[n], sl[n]], what=f"block {n}")
    rel = quiet(fl.fisher_ntk_trace, model, data, lik, kind)
    assert_close(rel.fisher_trace, F_ref.trace(), what="relation")
    assert_close(rel.ntk_side, F_ref.trace(), what="relation ntk side")
    assert_close(rel.ntk_trace, J.square().sum() / len(X), what="relation ntk trace")
    ev = quiet(fl.eigenvalues, model, data, lik, kind=kind, method="gram")
    top = torch.linalg.eigvalsh(F_ref).flip(0)[: len(ev)]
    assert_close(torch.as_tensor(ev), top, what="gram eigenvalues")


def test_ntk_views_against_reference(case):
    model, X, _ = case
    J = ref.jacobians(model, X)
    assert_close(quiet(fl.ntk, model, X), torch.einsum("nap,mbp->nmab", J, J), what="ntk")
    assert_close(quiet(fl.ntk_trace, model, X), J.square().sum(), what="ntk_trace")


def test_operator_and_jvp_views_against_reference(case):
    model, X, y = case
    F_ref = ref.fisher(model, X, y, ("categorical",), "true")
    lik = fl.Categorical()
    v = torch.randn(F_ref.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    op = quiet(fl.fisher_operator, model, (X, y), lik)
    assert_close(op @ v, F_ref @ v, what="F v")
    theta = ref.flat_params(model)
    assert_close(quiet(fl.fisher_rao_norm, model, (X, y), lik), theta @ F_ref @ theta, what="rao norm")
    top = quiet(fl.eigenvalues, model, (X, y), lik, k=1, method="lanczos")
    assert_close(torch.as_tensor(top)[0],
                 torch.linalg.eigvalsh(F_ref)[-1], rtol=1e-5, what="lanczos")


def test_fused_attention_restored_after_the_call():
    model, X, y = model_and_data("encoder_fused", 4, 3)
    assert torch.backends.mha.get_fastpath_enabled()
    quiet(fl.fisher_rao_norm, model, (X, y), fl.Categorical())
    assert torch.backends.mha.get_fastpath_enabled()


def test_transposed_linear_falls_back_with_a_warning_naming_it():
    model, X, y = model_and_data("transposed", 8, 4)
    with pytest.warns(UserWarning, match="lin.weight"):
        fl.fisher_diag(model, (X, y), fl.Categorical())


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_rnn_fallback_warns_once_naming_module_and_cost(cell):
    model, X, y = model_and_data(cell, 5, 4)
    with pytest.warns(UserWarning, match=r"(?s)'rnn' \((RNN|LSTM)\).*slower"):
        fl.fisher_trace(model, (X, y), fl.Categorical())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.fisher_trace(model, (X, y), fl.Categorical())  # said once


def test_per_sample_hutchinson_unbiased_on_sequence_first_layout():
    model, X, y = model_and_data("transposed", 8, 8)
    exact = ref.fisher(model, X, y, ("categorical",), "true").diagonal()
    est = quiet(fl.fisher_diag, model, (X, y), fl.Categorical(), method="hutchinson", per_sample=True,
                samples=400, generator=torch.Generator().manual_seed(0))
    z = (est.value - exact) / est.stderr.clamp_min(1e-12)
    assert z.abs().max() < 5.0


def test_rows_attributed_per_sample_not_only_in_sum():
    """The Gram view needs each sample's rows: the per-sample NTK blocks must match, not only their sum."""
    model, X, _ = model_and_data("transposed", 4, 4)
    J = ref.jacobians(model, X)
    K = quiet(fl.ntk, model, X)
    for n in range(len(X)):
        assert_close(K[n, n], J[n] @ J[n].T, what=f"Θ_{n}{n}")


@pytest.mark.parametrize("name", ["encoder_fused", "lstm"])
def test_monitor_probe_observables_on_transformer_and_rnn(name):
    model, X, y = model_and_data(name, 5, 4)
    obs = ("fisher_trace", "relation", "top_eigenvalue", "rao_norm", "path_length")
    mon = fl.Monitor(model, fl.Categorical(), (X, y), observables=obs)
    rec0 = quiet(mon.record, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    rec1 = quiet(mon.record, 1)
    F_ref = ref.fisher(model, X, y, ("categorical",), "true")
    theta = ref.flat_params(model)
    assert_close(rec1["fisher_trace"], F_ref.trace(), what="trace")
    assert_close(rec1["rao_norm"], theta @ F_ref @ theta, what="rao")
    assert_close(rec1["top_eigenvalue"], torch.linalg.eigvalsh(F_ref)[-1], rtol=1e-5, what="top")
    assert rec0["path_length"] == 0 and rec1["path_length"] > 0


class KeyBias(nn.Module):
    """Self-attention written with Linear projections: the key bias shifts every score of a query by the same
    amount, so softmax ignores it and its gradient is exactly zero (round-off in practice)."""

    def __init__(self):
        super().__init__()
        self.emb, self.h = nn.Embedding(11, 8), nn.Linear(8, 11)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, ids):
        x = self.emb(ids)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8**0.5, -1)
        return self.h(a @ self.v(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_parameter_with_zero_gradient_stays_layerwise(dtype):
    """The proof compares with an absolute floor at the gradient's own scale: a key bias (zero gradient up to
    round-off) is not demoted, and its diagonal agrees with the general engine."""
    torch.manual_seed(0)
    model = KeyBias().to(dtype).eval()
    ids = torch.randint(0, 11, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = fl.fisher_diag(model, (ids, ids), fl.Categorical(), kind="empirical")
    ref = fl.fisher_diag(model, (ids, ids), fl.Categorical(), kind="empirical", engine="functional")
    assert torch.allclose(d, ref, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6 * float(ref.max()))
