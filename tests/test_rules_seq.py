"""Layer rules for transformer layers: Linear on sequences (ghost norms / per-layer materialisation),
Embedding, LayerNorm and Hugging Face's Conv1D, and the convolutions' fast path (the Linear rule on the unfolded
patches) — rows against per-sample autograd, fast stats against the rows, and the engine owning them end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close
from torch import nn
from transformers.pytorch_utils import Conv1D

import fisherlens as fl
from fisherlens._core import FunctionalModel, plan_for, rule_for, signature
from fisherlens._core.layerwise.rules import (
    Call,
    Conv1DRule,
    ConvRule,
    EmbeddingRule,
    LayerNormRule,
    LinearRule,
)
from fisherlens._core.stats import Stats

pytestmark = pytest.mark.usefixtures("float64")

ALL = {"diag", "diagk", "sqnorm", "gram"}
K = 3


def reference_rows(m: nn.Module, a: torch.Tensor, g: torch.Tensor, which: str) -> torch.Tensor:
    """``(K, B, numel)``: autograd's gradient of ``f(a_b)·g_kb`` w.r.t. ``m.<which>``, sample by sample."""
    p, K, B = getattr(m, which), g.shape[0], a.shape[0]
    out = torch.zeros(K, B, p.numel())
    for k in range(K):
        for b in range(B):
            out[k, b] = torch.autograd.grad((m(a[b : b + 1]) * g[k, b : b + 1]).sum(), p)[0].reshape(-1)
    return out


def expected_stats(r: torch.Tensor, shape) -> Stats:
    """The engine's own reduction of rows ``r (K, B, numel)``."""
    st = Stats()
    st.add_rows("p", r.transpose(0, 1), ALL, shape)
    return st


def assert_stats(out: dict, r: torch.Tensor, shape, what: str):
    st = expected_stats(r, shape)
    assert set(out) == ALL
    for s in ("diag", "diagk", "sqnorm"):
        assert_close(out[s], getattr(st, s)["p"], rtol=1e-10, what=f"{what} {s}")
    assert_close(out["gram"], st.gram, rtol=1e-10, what=f"{what} gram")


def recorded(m: nn.Module, a: torch.Tensor):
    """A call of ``m`` on ``a`` and random output gradients ``(K, B, ...)``."""
    with torch.no_grad():
        out = m(a)
    return Call(m, a, out), torch.randn(K, *out.shape)


def check_rule(m: nn.Module, a: torch.Tensor, whiches=("weight", "bias"), fast: bool = True):
    rule = rule_for(m)
    call, g = recorded(m, a)
    for which in whiches:
        r = reference_rows(m, a, g, which)
        assert_close(rule.rows(call, g, which), r, rtol=1e-10, what=f"{which} rows")
        assert rule.fast([call]) is fast
        if fast:
            assert_stats(rule.fast_stats(call, g, which, ALL), r, getattr(m, which).shape, which)
    return rule, call, g


# ----------------------------------------------------------------------------- Linear on sequences
@pytest.mark.parametrize("shape", [(5, 4, 3), (5, 2, 3, 4)])
def test_linear_on_sequences(shape):
    torch.manual_seed(0)
    m = nn.Linear(shape[-1], 6)
    rule, call, g = check_rule(m, torch.randn(*shape))
    assert isinstance(rule, LinearRule)
    assert rule.batch_axes(call) == shape[1:-1]
    assert not rule.fast([call, call])


@pytest.mark.parametrize("ghost_diag", [True, False])
@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 3), (5, 2, 3, 4)])
def test_linear_ghost_and_materialised_branches(shape, ghost, ghost_diag):
    torch.manual_seed(1)
    m = nn.Linear(shape[-1], 6)
    a = torch.randn(*shape)
    call, g = recorded(m, a)
    r = reference_rows(m, a, g, "weight")
    gs, a3 = g.reshape(K, shape[0], -1, 6), a.reshape(shape[0], -1, shape[-1])
    assert_stats(LinearRule.seq_stats(a3, gs, ALL, ghost, ghost_diag), r, m.weight.shape, f"ghost={ghost}")
    diag = LinearRule.seq_stats(a3, gs, {"diag"}, ghost, ghost_diag)
    assert set(diag) == {"diag"}
    assert_close(diag["diag"], expected_stats(r, m.weight.shape).diag["p"], rtol=1e-10, what="diag alone")
    norms = LinearRule.seq_stats(a3, gs, {"sqnorm", "gram"}, ghost=ghost)
    st = expected_stats(r, m.weight.shape)
    assert set(norms) == {"sqnorm", "gram"}
    assert_close(norms["sqnorm"], st.sqnorm["p"], rtol=1e-10, what="sqnorm")
    assert_close(norms["gram"], st.gram, rtol=1e-10, what="gram")


def test_diagonal_cost_choice():
    def choice(T, I, O, K):
        return LinearRule.ghost_diag_cheaper(torch.zeros(2, T, I), torch.zeros(K, 2, T, O))

    assert choice(16, 4608, 512, 10)  # ResNet-18's last stage: 4×4 positions, wide patches — position pairs
    assert not choice(1024, 27, 64, 10)  # the stem: many positions, narrow patches — materialise
    assert not choice(64, 2304, 2, 1)  # T² > K·O: the pairs would outgrow G


def test_linear_cost_choice():
    def choice(T, I, O, want):
        return LinearRule.ghost_cheaper(torch.zeros(2, T, I), torch.zeros(K, 2, T, O), want)

    assert choice(2, 50, 50, {"sqnorm"}) and choice(2, 50, 50, {"gram"})  # short sequence, wide layer: ghost
    assert not choice(50, 2, 2, {"sqnorm"})  # long sequence, narrow layer: materialise
    assert not choice(2, 50, 50, {"sqnorm", "diag"})  # the diagonal needs G anyway


# ----------------------------------------------------------------------------- convolutions
CONVS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 6, 6)),
    "conv2d-strided-dilated": (lambda: nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0)),
                               (4, 2, 7, 8)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (4, 2, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=2, dilation=2), (5, 3, 9)),
    "conv2d-deep": (lambda: nn.Conv2d(8, 6, 3), (4, 8, 4, 4)),  # L = 4 ≤ I·k = 72: ghost norms for the trace
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_fast_path(name, monkeypatch):
    torch.manual_seed(3)
    make, shape = CONVS[name]
    m = make()
    rule, call, g = check_rule(m, torch.randn(*shape))
    assert isinstance(rule, ConvRule)
    r = reference_rows(m, call.a, g, "weight")
    st = expected_stats(r, m.weight.shape)
    branches = []
    seq_stats = LinearRule.seq_stats

    def spy(a, g, want, ghost, ghost_diag=False):
        branches.append(ghost)
        return seq_stats(a, g, want, ghost, ghost_diag)

    monkeypatch.setattr(LinearRule, "seq_stats", staticmethod(spy))
    norms = rule.fast_stats(call, g, "weight", {"sqnorm", "gram"})
    assert_close(norms["sqnorm"], st.sqnorm["p"], rtol=1e-10, what="sqnorm")
    assert_close(norms["gram"], st.gram, rtol=1e-10, what="gram")
    L, Ik, O = g[0, 0, 0].numel(), m.weight[0].numel(), m.out_channels  # output positions, patch size, channels
    cheaper = LinearRule.ghost_cheaper(torch.zeros(1, L, Ik), torch.zeros(K, 1, L, O), {"sqnorm", "gram"})
    assert branches == [L <= Ik and cheaper]
    if name == "conv2d-deep":
        assert branches == [True]


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 7), (4, 3, 5, 6)])
def test_batchnorm_in_eval_mode(shape):
    torch.manual_seed(5)
    m = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](3)
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.weight.normal_()
        m.bias.normal_()
    m.eval()
    rule, call, _ = check_rule(m, torch.randn(*shape))
    assert rule.batch_axes(call) == shape[2:]


def test_batchnorm_without_running_stats_is_not_owned():
    assert rule_for(nn.BatchNorm2d(3, track_running_stats=False)) is None
    assert rule_for(nn.BatchNorm2d(3, affine=False)) is None


def test_grouped_conv_takes_the_rows():
    torch.manual_seed(4)
    check_rule(nn.Conv2d(4, 6, 3, groups=2), torch.randn(3, 4, 5, 5), fast=False)


def test_linear_flat_input_unchanged():
    """(B, I) inputs keep the closed forms ``Σ g²a²``, ``‖g‖²‖a‖²``, ``(g_k·g_l)‖a‖²`` bit for bit."""
    torch.manual_seed(2)
    m = nn.Linear(3, 4)
    rule, call, g = check_rule(m, torch.randn(5, 3))
    a2 = call.a.square()
    out = rule.fast_stats(call, g, "weight", ALL)
    assert torch.equal(out["diag"], g.square().sum(0).T @ a2)
    assert torch.equal(out["diagk"], torch.einsum("kbo,bi->koi", g.square(), a2))
    assert torch.equal(out["sqnorm"], g.square().sum(-1).T * a2.sum(-1)[:, None])
    assert torch.equal(out["gram"], torch.einsum("kbo,lbo->bkl", g, g) * a2.sum(-1)[:, None, None])


# ----------------------------------------------------------------------------- Embedding
@pytest.mark.parametrize("ids_shape", [(4,), (4, 6), (4, 2, 3)])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(ids_shape, padding_idx):
    torch.manual_seed(3)
    m = nn.Embedding(5, 3, padding_idx=padding_idx)
    ids = torch.randint(0, 5, ids_shape)
    ids.view(ids_shape[0], -1)[:, 0] = 2  # every sample holds the padding id
    if len(ids_shape) > 1:
        ids.view(ids_shape[0], -1)[0, 1] = ids.view(ids_shape[0], -1)[0, -1]  # a repeated id within a sample
    rule, call, g = check_rule(m, ids, whiches=("weight",))
    assert isinstance(rule, EmbeddingRule)
    assert rule.batch_axes(call) == ids_shape[1:]
    if padding_idx is not None:
        assert rule.rows(call, g, "weight").reshape(K, ids_shape[0], 5, 3)[:, :, padding_idx].abs().max() == 0


@pytest.mark.parametrize("kw", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_embedding_refusals(kw):
    m = nn.Sequential(nn.Embedding(5, 3, **kw), nn.Flatten(), nn.Linear(6, 2))
    assert rule_for(m[0]) is None
    owned = plan_for(FunctionalModel(m)).owned
    assert "0.weight" not in owned and "2.weight" in owned


# ----------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize(("normalized", "shape"), [((4,), (5, 3, 4)), ((4,), (5, 4)), ((2, 3), (5, 4, 2, 3))])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(normalized, shape, bias):
    torch.manual_seed(4)
    m = nn.LayerNorm(normalized, bias=bias)
    with torch.no_grad():
        m.weight.normal_()
    a = 3 * torch.randn(*shape) + 1
    rule, call, _ = check_rule(m, a, whiches=("weight", "bias") if bias else ("weight",))
    assert isinstance(rule, LayerNormRule)
    assert rule.batch_axes(call) == shape[1 : len(shape) - len(normalized)]


def test_layernorm_without_affine_is_not_owned():
    assert rule_for(nn.LayerNorm(4, elementwise_affine=False)) is None


# ----------------------------------------------------------------------------- Hugging Face Conv1D
@pytest.mark.parametrize("shape", [(5, 3), (5, 4, 3), (5, 2, 2, 3)])
def test_hf_conv1d(shape):
    torch.manual_seed(5)
    m = Conv1D(6, shape[-1])
    with torch.no_grad():
        m.bias.normal_()
    rule, _, _ = check_rule(m, torch.randn(*shape))
    assert isinstance(rule, Conv1DRule)


def test_hf_conv1d_subclass_uses_its_rule():
    class MyConv1D(Conv1D):
        pass

    assert isinstance(rule_for(MyConv1D(2, 3)), Conv1DRule)


# ----------------------------------------------------------------------------- end to end
class Tiny(nn.Module):
    """Embedding → LayerNorm → Linear (B, T, D) → Conv1D → mean over T → Linear head (B, C)."""

    def __init__(self, V=7, D=4, H=5, C=3):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.norm = nn.LayerNorm(D)
        self.lin = nn.Linear(D, H)
        self.conv = Conv1D(H, H)
        self.head = nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.lin(self.norm(self.emb(x))))
        return self.head(torch.tanh(self.conv(h)).mean(1))


@pytest.mark.parametrize("T", [6, 5])  # T = B: the engine's ambiguity check column runs too
@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_engine_owns_transformer_layers(kind, T):
    torch.manual_seed(6)
    m = Tiny().double().eval()
    with torch.no_grad():
        m.norm.weight.normal_()
        m.norm.bias.normal_()
    X, Y = torch.randint(0, 7, (5, T)), torch.randint(0, 3, (5,))
    fm = FunctionalModel(m)
    names = [n for n, _ in m.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion warning
        assert set(signature(fm, X).fast) == set(names)  # owned, proven, and on the fast path
        for fn in (fl.fisher_diag, fl.fisher_trace):
            auto = fn(m, (X, Y), fl.Categorical(), kind=kind, engine="auto")
            func = fn(m, (X, Y), fl.Categorical(), kind=kind, engine="functional")
            assert_close(auto, func, rtol=1e-10, what=f"{fn.__name__} {kind}")
        ntk = fl.fisher_ntk_trace(m, (X, Y), fl.Categorical(), kind=kind, engine="layerwise")
        ref = fl.fisher_ntk_trace(m, (X, Y), fl.Categorical(), kind=kind, engine="functional")
        assert_close(ntk.ntk_trace, ref.ntk_trace, rtol=1e-10, what="ntk trace (gram)")
        assert_close(ntk.fisher_trace, ref.fisher_trace, rtol=1e-10, what="fisher trace (gram)")
    assert set(plan_for(fm).owned) == set(names)
