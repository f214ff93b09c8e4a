"""Structured outputs ``(B, *positions, C)`` / ``(B, C, *positions)``: every view of the Fisher against the slow
float64 reference of ``reference.py`` (a loop over inputs, positions and classes), with ignored and masked
positions, both normalisations (per input: ``reduction="mean"``; per prediction: ``reduction="per_prediction"``),
both channel layouts, and kinds true / empirical (mc: unbiased, loose).

Models (``zoo.py``): a causal transformer LM (Embedding → TransformerEncoderLayer with a causal mask → Linear,
logits ``(B, T, V)``), a Conv1d segmentation model (channel-first ``(B, C, L)``), a Conv2d one (two position axes),
and a multi-label MLP (``(N, K)`` independent Bernoullis).  Also: agreement with curvlinops' GGN / EF operators,
``fl.Monitor`` on an LM, and the refusals of bad input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import assert_close, bonferroni_z
from torch import nn
from zoo import DT, Wrapped, lm_case, logcosh, multilabel_case, seg_case

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

SIGMA = 0.7
RTOL = 1e-8
REDUCTIONS = ("mean", "per_prediction")


def ce_rows(f, y):
    """A LossInduced loss on rows ``(R, C)`` with class ids ``(R,)``: the softmax cross-entropy."""
    return F.cross_entropy(f, y, reduction="none")


# ----------------------------------------------------------------------------- cases
@dataclass
class SeqCase:
    """A model and its data for the library (``data``), and the same for the reference (``X``, ``Y``, ``mask``)."""

    name: str
    model: nn.Module
    data: object
    X: object
    Y: torch.Tensor | None
    make: object  # () -> fl.Likelihood
    spec: tuple
    channels: str = "last"
    mask: torch.Tensor | None = None
    kinds: tuple[str, ...] = ("true", "empirical")
    extra: dict = field(default_factory=dict)

    @property
    def lik(self):
        return self.make()

    def ref(self, kind, reduction="mean", what="dense", **kw):
        return ref.seq_fisher(self.model, self.X, self.Y, kind, self.spec, self.channels, -100, self.mask, reduction,
                              what=what, **kw)

    def count(self):
        return ref.seq_count(self.model, self.X, self.Y, self.spec, self.channels, -100, self.mask)


def _float_targets(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _mask(shape, seed, drop=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(shape, dtype=torch.bool).reshape(-1)
    m[torch.randperm(m.numel(), generator=g)[:drop]] = False
    return m.reshape(shape)


def make_seq_case(name: str) -> SeqCase:
    if name == "lm_ignore":  # tuple data, -100 at the last and padded positions
        model, X, Y = lm_case()
        return SeqCase(name, model, (X, Y), X, Y, fl.Categorical, ("categorical",))
    if name == "lm_mask":  # dict batch, labels everywhere (arbitrary at the dropped positions) and a mask
        model, X, Y = lm_case()
        mask = Y != -100
        Yf = torch.where(mask, Y, torch.remainder(X + 3, 7))
        data = [{"input_ids": X, "labels": Yf, "mask": mask}]
        return SeqCase(name, model, data, X, Yf, fl.Categorical, ("categorical",), mask=mask)
    if name == "seg_first":  # channel-first (B, C, L), -100 labels
        model, X, Y = seg_case()
        return SeqCase(name, model, (X, Y), X, Y, lambda: fl.Categorical(channels="first"), ("categorical",),
                       "first")
    if name == "seg2d_first":  # channel-first (B, C, H, W): two position axes
        model, X, Y = seg_case(two_d=True)
        return SeqCase(name, model, (X, Y), X, Y, lambda: fl.Categorical(channels="first"), ("categorical",),
                       "first")
    if name == "seg_gauss":  # Gaussian, channel-first, float targets shaped like the outputs, a mask (B, L)
        model, X, _ = seg_case()
        Yf = _float_targets((len(X), 3, X.shape[-1]), 1)
        mask = _mask((len(X), X.shape[-1]), 2)
        data = [{"x": X, "labels": Yf, "mask": mask}]
        return SeqCase(name, model, data, X, Yf, lambda: fl.Gaussian(SIGMA, channels="first"), ("gaussian", SIGMA),
                       "first", mask=mask)
    if name == "lm_gauss":  # Gaussian, channels last, (B, T, V) targets
        model, X, _ = lm_case()
        Yf = _float_targets((len(X), X.shape[1], 7), 3)
        return SeqCase(name, model, (X, Yf), X, Yf, lambda: fl.Gaussian(SIGMA), ("gaussian", SIGMA))
    if name == "multilabel":  # (N, K) logits = K independent Bernoullis
        model, X, Y = multilabel_case()
        return SeqCase(name, model, (X, Y), X, Y, fl.Bernoulli, ("bernoulli",))
    if name == "multilabel_mask":  # (N, K) Bernoullis with some logits masked out (the mask has the outputs' shape)
        model, X, Y = multilabel_case()
        mask = _mask(tuple(Y.shape), 6, drop=4)
        data = [{"input": X, "labels": Y, "mask": mask}]  # nn.Sequential's forward takes `input`
        return SeqCase(name, model, data, X, Y, fl.Bernoulli, ("bernoulli",), mask=mask)
    if name == "seg_bernoulli":  # every logit of (B, C, L) an independent Bernoulli
        model, X, _ = seg_case()
        Yb = torch.randint(0, 2, (len(X), 3, X.shape[-1]), generator=torch.Generator().manual_seed(4)).to(DT)
        return SeqCase(name, model, (X, Yb), X, Yb, fl.Bernoulli, ("bernoulli",))
    if name == "lm_loss_ce":  # LossInduced on rows (R, C) with class ids, masked
        model, X, Y = lm_case()
        mask = Y != -100
        Yf = torch.where(mask, Y, torch.zeros_like(Y))
        data = [{"input_ids": X, "labels": Yf, "mask": mask}]
        return SeqCase(name, model, data, X, Yf, lambda: fl.LossInduced(ce_rows), ("custom", ce_rows), mask=mask,
                       kinds=("empirical",))
    if name == "lm_loss_logcosh":  # LossInduced on rows (R, C) with float targets, masked
        model, X, Y = lm_case()
        mask = Y != -100
        Yf = _float_targets((len(X), X.shape[1], 7), 5)
        data = [{"input_ids": X, "labels": Yf, "mask": mask}]
        return SeqCase(name, model, data, X, Yf, lambda: fl.LossInduced(logcosh), ("custom", logcosh), mask=mask,
                       kinds=("empirical",))
    raise KeyError(name)


CASES = ("lm_ignore", "lm_mask", "seg_first", "seg2d_first", "seg_gauss", "lm_gauss", "multilabel", "multilabel_mask",
         "seg_bernoulli", "lm_loss_ce", "lm_loss_logcosh")
_CACHE: dict = {}


def case(name: str) -> SeqCase:
    if name not in _CACHE:
        _CACHE[name] = make_seq_case(name)
    return _CACHE[name]


def reference(name: str, kind: str, reduction: str = "mean") -> torch.Tensor:
    key = (name, kind, reduction)
    if key not in _CACHE:
        _CACHE[key] = case(name).ref(kind, reduction)
    return _CACHE[key]


def case_kinds(names=CASES, kinds=("true", "empirical")):
    return [pytest.param(n, k, id=f"{n}-{k}") for n in names for k in kinds if k in make_seq_case(n).kinds]


# ----------------------------------------------------------------------------- the reference itself
def test_reference_counts_and_normalisations():
    """The reference's kept-position counts and the three normalisations relate as they should."""
    c = case("lm_ignore")
    assert c.count() == int((c.Y != -100).sum())
    N = len(c.X)
    F_sum = c.ref("true", "sum")
    assert_close(reference("lm_ignore", "true", "mean"), F_sum / N, 1e-12, "mean")
    assert_close(reference("lm_ignore", "true", "per_prediction"), F_sum / c.count(), 1e-12, "per_prediction")
    assert_close(case("lm_mask").ref("true"), reference("lm_ignore", "true"), 1e-12, "mask = ignore_index")


# ----------------------------------------------------------------------------- exact views
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "kind"), case_kinds())
def test_exact_views(name, kind, reduction):
    """fisher_matrix, fisher_diag, fisher_trace and fisher_blocks (diag / trace / dense) equal the reference."""
    c = case(name)
    F_ref = reference(name, kind, reduction)
    kw = {"reduction": reduction}
    assert_close(fl.fisher_matrix(c.model, c.data, c.lik, kind, **kw), F_ref, RTOL, "fisher_matrix")
    assert_close(fl.fisher_diag(c.model, c.data, c.lik, kind, **kw), torch.diagonal(F_ref), RTOL, "fisher_diag")
    tr = fl.fisher_trace(c.model, c.data, c.lik, kind, **kw)
    assert math.isclose(tr, float(torch.trace(F_ref)), rel_tol=RTOL), f"fisher_trace {tr} vs {torch.trace(F_ref)}"
    blocks = ref.blocks(F_ref, c.model)
    got = fl.fisher_blocks(c.model, c.data, c.lik, kind, what="dense", **kw)
    assert list(got) == list(blocks)
    for n, b in blocks.items():
        assert_close(got[n], b, RTOL, f"block {n}")
    got = fl.fisher_blocks(c.model, c.data, c.lik, kind, what="diag", **kw)
    for n, d in ref.block_diags(F_ref, c.model).items():
        assert_close(got[n], d, RTOL, f"block diag {n}")
    got = fl.fisher_blocks(c.model, c.data, c.lik, kind, what="trace", **kw)
    for n, t in ref.block_traces(F_ref, c.model).items():
        assert math.isclose(got[n], t, rel_tol=RTOL, abs_tol=1e-14), f"block trace {n}: {got[n]} vs {t}"


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_reduction_sum(kind):
    c = case("seg_first")
    assert_close(fl.fisher_matrix(c.model, c.data, c.lik, kind, reduction="sum"), c.ref(kind, "sum"), RTOL, "sum")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "kind"), case_kinds(("lm_mask", "seg_first", "seg_gauss")))
def test_fisher_rao_norm(name, kind, reduction):
    c = case(name)
    th = ref.flat_params(c.model).double()
    want = float(th @ reference(name, kind, reduction) @ th)
    got = fl.fisher_rao_norm(c.model, c.data, c.lik, kind, reduction=reduction)
    assert math.isclose(got, want, rel_tol=RTOL), (got, want)


def test_per_input_gradient_is_the_summed_loss_gradient():
    """The empirical Fisher uses g_n = ∇(Σ_t ℓ_nt) per input, not per-position outer products."""
    c = case("seg_first")
    per_pos = ref.seq_position_empirical_fisher(c.model, c.X, c.Y, c.spec, c.channels)
    lib = fl.fisher_matrix(c.model, c.data, c.lik, "empirical")
    assert_close(lib, reference("seg_first", "empirical"), RTOL, "empirical")
    assert (lib - per_pos).norm() > 1e-3 * per_pos.norm()  # the two definitions differ on this model


# ----------------------------------------------------------------------------- operator, spectrum, envelope
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "kind"), case_kinds(("lm_ignore", "lm_mask", "seg_first", "seg_gauss",
                                                        "multilabel", "lm_loss_ce")))
def test_operator(name, kind, reduction):
    c = case(name)
    F_ref = reference(name, kind, reduction)
    P = F_ref.shape[0]
    g = torch.Generator().manual_seed(8)
    v, V = torch.randn(P, generator=g, dtype=DT), torch.randn(P, 3, generator=g, dtype=DT)
    op = fl.fisher_operator(c.model, c.data, c.lik, kind, reduction=reduction)
    assert tuple(op.shape) == (P, P)
    assert_close(op @ v, F_ref @ v, RTOL, "op @ v")
    assert_close(op @ V, F_ref @ V, RTOL, "op @ V")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "kind"), case_kinds(("lm_ignore", "seg_first", "seg_gauss")))
def test_eigenvalues(name, kind, reduction):
    """gram, dense and lanczos eigenvalues vs eigvalsh of the reference."""
    c = case(name)
    want = torch.linalg.eigvalsh(reference(name, kind, reduction)).flip(0)
    top = float(want[0])
    for method in ("gram", "dense", "lanczos"):
        vals = fl.eigenvalues(c.model, c.data, c.lik, k=4, method=method, kind=kind, reduction=reduction)
        rtol = 1e-6 if method == "lanczos" else RTOL
        torch.testing.assert_close(vals.double(), want[:4], rtol=rtol, atol=rtol * top,
                                   msg=lambda m, method=method: f"{method}: {m}")
    vals = fl.eigenvalues(c.model, c.data, c.lik, k=None, method="dense", kind=kind, reduction=reduction)
    torch.testing.assert_close(vals.double(), want.clamp_min(0), rtol=0, atol=1e-10 * top)


def test_gram_eigenvectors():
    """Gram eigenvectors are eigenvectors of the reference Fisher."""
    c = case("lm_ignore")
    F_ref = reference("lm_ignore", "true")
    vals, vecs = fl.eigenvalues(c.model, c.data, c.lik, k=3, method="gram", return_vectors=True)
    assert_close(F_ref @ vecs, vecs * vals, 1e-7, "F v = λ v")


def test_spectral_density():
    """SLQ on a sequence model: weights sum to 1 per probe, the top node is λ_max, and P·Σ w θ (= vᵀFv per
    Rademacher probe) averages to tr F within its standard error."""
    c = case("lm_ignore")
    F_ref = reference("lm_ignore", "true")
    lam = torch.linalg.eigvalsh(F_ref)
    sd = fl.spectral_density(c.model, c.data, c.lik, probes=24, steps=30, generator=torch.Generator().manual_seed(2))
    assert sd.dim == F_ref.shape[0]
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(24, dtype=DT), rtol=0, atol=1e-10)
    top = float(sd.nodes.max())
    assert abs(top - float(lam[-1])) <= 1e-6 * float(lam[-1]), (top, float(lam[-1]))
    per_probe = sd.dim * (sd.weights * sd.nodes).sum(1)
    se = float(per_probe.std()) / math.sqrt(len(per_probe))
    assert abs(float(per_probe.mean()) - float(torch.trace(F_ref))) < 4 * se + 1e-9


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["diag", "isotropic"])
def test_envelope(which, reduction):
    """fl.bounds.envelope on LM logits, summed over the (masked) positions like the Fisher, and above it."""
    c = case("lm_mask")
    mask = c.mask
    data = [{"input_ids": c.X, "mask": mask}]
    U = ref.seq_envelope(c.model, c.X, which, mask=mask, reduction=reduction)
    assert_close(fl.bounds.envelope(c.model, data, which, "dense", reduction=reduction), U, RTOL, "dense")
    assert_close(fl.bounds.envelope(c.model, data, which, "diag", reduction=reduction), torch.diagonal(U), RTOL,
                 "diag")
    t = fl.bounds.envelope(c.model, data, which, "trace", reduction=reduction)
    assert math.isclose(t, float(torch.trace(U)), rel_tol=RTOL)
    gap = torch.linalg.eigvalsh(U - reference("lm_mask", "true", reduction))
    assert float(gap.min()) > -1e-10 * float(gap.abs().max())  # U ⪰ F
    # without labels or a mask every position counts
    U_all = ref.seq_envelope(c.model, c.X, which, reduction=reduction)
    assert_close(fl.bounds.envelope(c.model, (c.X, None), which, "dense", reduction=reduction), U_all, RTOL, "all")


# ----------------------------------------------------------------------------- NTK
@pytest.mark.parametrize("name", ["lm_ignore", "seg_first", "seg2d_first"])
def test_ntk(name):
    """fl.ntk is (N1, N2, M, M) with M the flattened per-input output size, in the model's own flatten order."""
    c = case(name)
    X = c.X
    want = ref.seq_ntk(c.model, X)
    got = fl.ntk(c.model, X)
    M = want.shape[-1]
    assert got.shape == (len(X), len(X), M, M)
    assert_close(got, want, RTOL, "ntk")
    assert_close(fl.ntk(c.model, X[:2], X[1:]), want[:2, 1:], RTOL, "ntk(x1, x2)")
    tr = float(torch.einsum("nnaa->", want))
    assert math.isclose(fl.ntk_trace(c.model, X, reduction="sum"), tr, rel_tol=RTOL)
    assert math.isclose(fl.ntk_trace(c.model, X, reduction="mean"), tr / len(X), rel_tol=RTOL)


@pytest.mark.parametrize(("name", "kind"), case_kinds(("lm_ignore", "seg_first", "seg_gauss", "multilabel",
                                                        "lm_loss_ce")))
def test_fisher_ntk_trace(name, kind):
    """Both sides of tr F = (1/N) Σ_n tr(V_nᵀ Θ_nn V_n) equal the reference trace (ignored positions have V = 0);
    ntk_trace is (1/N) Σ_n tr Θ_nn over all M outputs (the NTK does not depend on labels)."""
    c = case(name)
    tr = float(torch.trace(reference(name, kind)))
    rel = fl.fisher_ntk_trace(c.model, c.data, c.lik, kind)
    assert math.isclose(rel.fisher_trace, tr, rel_tol=RTOL), (rel.fisher_trace, tr)
    assert math.isclose(rel.ntk_side, tr, rel_tol=RTOL), (rel.ntk_side, tr)
    theta = ref.seq_ntk(c.model, c.X)
    assert math.isclose(rel.ntk_trace, float(torch.einsum("nnaa->", theta)) / len(c.X), rel_tol=RTOL)


# ----------------------------------------------------------------------------- random estimates
def test_kind_mc_is_unbiased():
    """kind='mc' with many sampled labels per position approaches the true Fisher (loose: 2000 draws)."""
    c = case("seg_first")
    F_ref = reference("seg_first", "true")
    gen = torch.Generator().manual_seed(5)
    Fm = fl.fisher_matrix(c.model, c.data, c.lik, "mc", samples=2000, generator=gen)
    assert float((Fm - F_ref).norm() / F_ref.norm()) < 0.08
    tr = fl.fisher_trace(c.model, c.data, c.lik, "mc", samples=2000, generator=torch.Generator().manual_seed(6))
    assert abs(tr / float(torch.trace(F_ref)) - 1) < 0.03
    # the same generator state gives the same draws
    again = fl.fisher_matrix(c.model, c.data, c.lik, "mc", samples=2000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(Fm, again)


RANDOM_CASES = [("lm_ignore", "hutchinson"), ("seg_first", "hutchinson"), ("seg_gauss", "hutchinson"),
                ("seg_first", "mc"), ("seg_gauss", "mc")]


@pytest.mark.parametrize(("name", "method"), RANDOM_CASES, ids=[f"{n}-{m}" for n, m in RANDOM_CASES])
def test_random_diag_and_trace_unbiased(name, method):
    """method='hutchinson' / 'mc' return Estimates whose values lie within a few stderr of the exact diag / trace.

    Not mc on the LM: one of its classes has probability ~3e-5 at every position, so 400 draws of labels at its 16
    kept positions usually never sample it, and the entries of that class's head row come out ~1e-7 with a
    stderr ~1e-24 against an exact ~1e-3 — unbiased but heavy-tailed (the MC CV is unbounded on peaked
    classifiers, see fisherlens.estimators), so no stderr-based check is meaningful there."""
    c = case(name)
    F_ref = reference(name, "true")
    d = torch.diagonal(F_ref)
    S = 400
    e = fl.fisher_diag(c.model, c.data, c.lik, method=method, samples=S, generator=torch.Generator().manual_seed(1))
    assert isinstance(e, fl.Estimate) and e.samples == S
    z = bonferroni_z(len(d))
    bad = (e.value - d).abs() > z * e.stderr + 1e-12 * float(d.max())
    assert not bad.any(), f"{int(bad.sum())} entries: {e.value[bad]} vs {d[bad]} ± {e.stderr[bad]}"
    t = fl.fisher_trace(c.model, c.data, c.lik, method=method, samples=S, generator=torch.Generator().manual_seed(2))
    assert isinstance(t, fl.Estimate)
    assert abs(t.value - float(torch.trace(F_ref))) < 4 * t.stderr
    pp = fl.fisher_diag(c.model, c.data, c.lik, method=method, samples=S, reduction="per_prediction",
                        generator=torch.Generator().manual_seed(3))
    d_pp = torch.diagonal(reference(name, "true", "per_prediction"))
    bad = (pp.value - d_pp).abs() > z * pp.stderr + 1e-12 * float(d_pp.max())
    assert not bad.any(), "per_prediction"


def test_hutchinson_per_sample_unbiased():
    """The per-sample estimator (1/N) Σ_n (J_nᵀ ξ_n)², ξ_n drawn at every kept position of input n."""
    c = case("lm_ignore")
    d = torch.diagonal(reference("lm_ignore", "true"))
    e = fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", samples=300, per_sample=True,
                       generator=torch.Generator().manual_seed(7))
    bad = (e.value - d).abs() > bonferroni_z(len(d)) * e.stderr + 1e-12 * float(d.max())
    assert not bad.any(), f"{int(bad.sum())} entries"


def test_hutchinson_blocks_unbiased():
    c = case("lm_ignore")
    F_ref = reference("lm_ignore", "true")
    got = fl.fisher_blocks(c.model, c.data, c.lik, what="trace", method="hutchinson", samples=400,
                           generator=torch.Generator().manual_seed(4))
    for n, t in ref.block_traces(F_ref, c.model).items():
        assert abs(got[n].value - t) < 4.5 * got[n].stderr + 1e-12, (n, got[n].value, t, got[n].stderr)


def test_hutchinson_cv_below_root2():
    """One Rademacher draw has a per-entry coefficient of variation ≤ √2 (the estimate over 4000 draws, + slack)."""
    c = case("lm_ignore")
    d = torch.diagonal(reference("lm_ignore", "true"))
    S = 4000
    e = fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", samples=S,
                       generator=torch.Generator().manual_seed(9))
    live = d > 1e-6 * float(d.max())
    cv = e.stderr[live] * math.sqrt(S) / e.value[live]
    assert float(cv.max()) <= math.sqrt(2) * 1.1, float(cv.max())
    assert float(cv.median()) > 0.3  # the draws are random


# ----------------------------------------------------------------------------- Monitor
MONITOR_OBS = {"fisher": ("fisher_trace", "ntk_trace", "relation", "rao_norm"), "loss": ("loss", "grad_norm")}


@pytest.mark.parametrize("which", list(MONITOR_OBS))
def test_monitor_on_lm_training(which):
    """Monitor probe observables on an LM after training steps equal the references at the same parameters
    (loss: the probe mean over inputs of each input's summed loss; grad_norm: the norm of its gradient)."""
    observables = MONITOR_OBS[which]
    model, X, Y = lm_case(seed=1, n=6)
    probe, train = (X[:3], Y[:3]), (X[3:], Y[3:])
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=observables, kind="true")
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(2):
        out = model(train[0])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), train[1].reshape(-1), reduction="sum") / len(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
    if which == "loss":
        losses = ref.seq_input_losses(model, probe[0], probe[1], "categorical")
        g = ref.flat_grad(losses.mean(), [p for p in model.parameters()])
        assert math.isclose(rec["grad_norm"], float(g.norm()), rel_tol=1e-8), (rec["grad_norm"], float(g.norm()))
        assert math.isclose(rec["loss"], float(losses.mean()), rel_tol=1e-10), (rec["loss"], float(losses.mean()))
        return
    F_ref = ref.seq_fisher(model, probe[0], probe[1], "true", "categorical")
    tr = float(torch.trace(F_ref))
    assert math.isclose(rec["fisher_trace"], tr, rel_tol=1e-8), (rec["fisher_trace"], tr)
    assert math.isclose(rec["ntk_side"], tr, rel_tol=1e-8)
    theta = ref.seq_ntk(model, probe[0])
    assert math.isclose(rec["ntk_trace"], float(torch.einsum("nnaa->", theta)) / 3, rel_tol=1e-8)
    th = ref.flat_params(model).double()
    assert math.isclose(rec["rao_norm"], float(th @ F_ref @ th), rel_tol=1e-8)


@pytest.mark.parametrize(("kind", "method"), [("empirical", "exact"), ("true", "exact")])
def test_monitor_batch_fisher_trace_on_segmentation(kind, method):
    """batch_fisher_trace on a channel-first Conv1d model equals the reference trace at θ before the step (the
    training loss: the mean over inputs of each input's summed cross-entropy)."""
    model, X, Y = seg_case(n=5)
    model.train()
    lik = fl.Categorical(channels="first")
    mon = fl.Monitor(model, lik, (X[:2], Y[:2]), observables=("batch_fisher_trace",), kind=kind, method=method)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    xb, yb = X[2:], Y[2:]
    before = ref.seq_fisher(copy.deepcopy(model), xb, yb, kind, "categorical", "first")  # not seen by the hooks
    out = model(xb)
    loss = F.cross_entropy(out, yb, reduction="sum") / len(xb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    rec = mon.step(loss=loss, outputs=out, targets=yb)
    mon.close()
    assert math.isclose(rec["batch_fisher_trace"], float(torch.trace(before)), rel_tol=1e-8)


# ----------------------------------------------------------------------------- curvlinops
def _dense(op, P):
    return op @ torch.eye(P, dtype=DT)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_curvlinops_ce_ggn_is_the_per_prediction_fisher():
    """curvlinops' GGN of nn.CrossEntropyLoss(reduction="mean") on (N, C, L) logits (with ignore_index=-100
    labels, one batch) is (1/K) Σ_n Σ_{t kept} J_ntᵀ (diag π − ππᵀ) J_nt with K the number of non-ignored
    predictions: fl.fisher_matrix(kind="true", fl.Categorical(channels="first"), reduction="per_prediction")."""
    from curvlinops import GGNLinearOperator

    c = case("seg_first")
    P = sum(p.numel() for p in _params(c.model))
    G = _dense(GGNLinearOperator(c.model, nn.CrossEntropyLoss(), _params(c.model), [(c.X, c.Y)]), P)
    lib = fl.fisher_matrix(c.model, c.data, c.lik, "true", reduction="per_prediction")
    assert_close(lib, G, RTOL, "GGN")


def _one_position_per_copy(X, Y, positions: int):
    """Each input repeated once per position; copy t keeps position t only (labels -100 / mask False elsewhere)."""
    N = len(Y)
    Xr = X.repeat_interleave(positions, 0)
    Yr = Y.repeat_interleave(positions, 0)
    keep = torch.zeros(N * positions, positions, dtype=torch.bool)
    keep[torch.arange(N * positions), torch.arange(N * positions) % positions] = True
    return Xr, Yr, keep


def test_curvlinops_ce_ef_is_the_per_position_empirical_fisher():
    """curvlinops' EF of nn.CrossEntropyLoss(reduction="mean") on (N, C, L) flattens the positions into the batch
    axis ("batch c ... -> (batch ...) c") and rescales by N·L: EF = (1/(N·L)) Σ_{n,t} g_nt g_ntᵀ with g_nt the
    gradient of one position's loss — per-position outer products, not the library's per-input g_n = ∇ Σ_t ℓ_nt.
    Mapping: repeat every input L times, keep position t of copy t (labels -100 elsewhere), and take
    fl.fisher_matrix(kind="empirical", reduction="per_prediction") (1 / (N·L) kept positions).
    (With ignored labels curvlinops' EF becomes (N·L/K²) Σ_kept g gᵀ — its reduction factor counts ignored
    positions — so this comparison uses labels without -100.)"""
    from curvlinops import EFLinearOperator

    model, X, Y = seg_case(ignored=0)
    L = Y.shape[1]
    P = sum(p.numel() for p in _params(model))
    E = _dense(EFLinearOperator(model, nn.CrossEntropyLoss(), _params(model), [(X, Y)]), P)
    assert_close(ref.seq_position_empirical_fisher(model, X, Y, "categorical", "first", reduction="per_prediction"),
                 E, 1e-10, "reference vs curvlinops")
    Xr, Yr, keep = _one_position_per_copy(X, Y, L)
    Yr = torch.where(keep, Yr, torch.full_like(Yr, -100))
    lib = fl.fisher_matrix(model, (Xr, Yr), fl.Categorical(channels="first"), "empirical", reduction="per_prediction")
    assert_close(lib, E, RTOL, "EF")
    own = fl.fisher_matrix(model, (X, Y), fl.Categorical(channels="first"), "empirical", reduction="per_prediction")
    assert (own - E).norm() > 1e-3 * E.norm()  # the library's own empirical Fisher is a different matrix


def test_curvlinops_mse_ggn_and_ef():
    """nn.MSELoss(reduction="mean") on (N, T, V) averages over N·T·V numbers: its GGN is (2/(N·T·V)) Σ J_nᵀ J_n =
    fl.fisher_matrix(kind="true", fl.Gaussian(sigma=1/√2), reduction="per_prediction") / V (per-position Fisher
    I/σ² = 2I, N·T predictions).  Its EF flattens positions into rows (N·T, V) with g_r = ∇‖f_r − y_r‖² and the
    factor N·T·V: (1/(N·T·V)) Σ_r g_r g_rᵀ = the per-position empirical Fisher of fl.Gaussian(1/√2) (whose
    row loss is ‖f − y‖²) with per_prediction / V — computed with one kept position per input copy (a mask in a
    dict batch)."""
    from curvlinops import EFLinearOperator, GGNLinearOperator

    model, X, _ = lm_case()
    Yf = _float_targets((len(X), X.shape[1], 7), 7)
    N, T, V = Yf.shape
    P = sum(p.numel() for p in _params(model))
    lik = fl.Gaussian(1 / math.sqrt(2))
    G = _dense(GGNLinearOperator(model, nn.MSELoss(), _params(model), [(X, Yf)]), P)
    assert_close(fl.fisher_matrix(model, (X, Yf), lik, "true", reduction="per_prediction") / V, G, RTOL, "GGN")
    E = _dense(EFLinearOperator(model, nn.MSELoss(), _params(model), [(X, Yf)]), P)
    Xr, Yr, keep = _one_position_per_copy(X, Yf, T)
    data = [{"input_ids": Xr, "labels": Yr, "mask": keep}]
    assert_close(fl.fisher_matrix(model, data, lik, "empirical", reduction="per_prediction") / V, E, RTOL, "EF")


def test_curvlinops_bce_multilabel():
    """nn.BCEWithLogitsLoss(reduction="mean") on (N, K) averages over N·K logits: GGN = (1/(N·K)) Σ_n J_nᵀ
    diag(π(1−π)) J_n = fl.fisher_matrix(kind="true", fl.Bernoulli(), reduction="sum") / (N·K).  Its EF keeps the
    rows of the (N, K) output (one per input, K channels) and the factor N·K: (1/(N·K)) Σ_n g_n g_nᵀ with g_n the
    gradient of input n's summed BCE = fl.fisher_matrix(kind="empirical", reduction="sum") / (N·K)."""
    from curvlinops import EFLinearOperator, GGNLinearOperator

    c = case("multilabel")
    N, K = c.Y.shape
    P = sum(p.numel() for p in _params(c.model))
    G = _dense(GGNLinearOperator(c.model, nn.BCEWithLogitsLoss(), _params(c.model), [c.data]), P)
    E = _dense(EFLinearOperator(c.model, nn.BCEWithLogitsLoss(), _params(c.model), [c.data]), P)
    assert_close(fl.fisher_matrix(c.model, c.data, c.lik, "true", reduction="sum") / (N * K), G, RTOL, "GGN")
    assert_close(fl.fisher_matrix(c.model, c.data, c.lik, "empirical", reduction="sum") / (N * K), E, RTOL, "EF")


def test_bernoulli_per_prediction_counts_every_logit():
    """Multi-label (N, K) = N·K independent predictions: per_prediction is BCEWithLogitsLoss's mean (1/(N·K))."""
    c = case("multilabel")
    N, K = c.Y.shape
    assert c.count() == N * K
    F_sum = c.ref("true", "sum")
    assert_close(fl.fisher_matrix(c.model, c.data, c.lik, "true", reduction="per_prediction"), F_sum / (N * K),
                 RTOL, "per_prediction")


# ----------------------------------------------------------------------------- output= and dict batches
def test_non_tensor_output_needs_output_argument():
    c = case("lm_ignore")
    wrapped = Wrapped(c.model)
    with pytest.raises(TypeError, match="output="):
        fl.fisher_diag(wrapped, c.data, c.lik)
    pick = lambda out: out["logits"]  # noqa: E731
    d = fl.fisher_diag(wrapped, c.data, c.lik, output=pick)
    assert_close(d, torch.diagonal(reference("lm_ignore", "true")), RTOL, "output=")
    assert_close(fl.ntk(wrapped, c.X, output=pick), ref.seq_ntk(c.model, c.X), RTOL, "ntk output=")


def test_dict_batches_in_several_chunks():
    """A list of dict batches (kwargs for the model, labels, mask) is streamed; the result does not depend on how
    the inputs are split."""
    c = case("lm_mask")
    X, Y, m = c.X, c.Y, c.mask
    data = [{"input_ids": X[:1], "labels": Y[:1], "mask": m[:1]}, {"input_ids": X[1:], "labels": Y[1:], "mask": m[1:]}]
    for kind in ("true", "empirical"):
        for reduction in REDUCTIONS:
            assert_close(fl.fisher_matrix(c.model, data, c.lik, kind, reduction=reduction),
                         reference("lm_mask", kind, reduction), RTOL, f"{kind} {reduction}")


def test_tensor_batches_with_batch_size():
    c = case("lm_ignore")
    for reduction in REDUCTIONS:
        assert_close(fl.fisher_matrix(c.model, c.data, c.lik, "empirical", reduction=reduction, batch_size=3),
                     reference("lm_ignore", "empirical", reduction), RTOL, reduction)


# ----------------------------------------------------------------------------- bad input
def test_bad_label_shapes():
    c = case("lm_ignore")
    X, Y = c.X, c.Y
    longer = torch.cat([Y, Y[:, :1]], 1)  # (N, T+1)
    with pytest.raises(ValueError, match="(?i)shape|label"):
        fl.fisher_diag(c.model, (X, longer), c.lik, "empirical")
    s = case("seg_first")
    with pytest.raises(ValueError, match="(?i)shape|label|channel"):  # channel-first outputs read as channels-last
        fl.fisher_diag(s.model, s.data, fl.Categorical(), "empirical")
    g = case("seg_gauss")
    with pytest.raises(ValueError, match="(?i)shape|target|label"):
        fl.fisher_diag(g.model, (g.X, g.Y[:, :, :-1]), fl.Gaussian(SIGMA, channels="first"), "empirical")
    bad_mask = torch.ones(len(X), X.shape[1] + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="(?i)mask|shape"):
        fl.fisher_diag(c.model, [{"input_ids": X, "labels": Y, "mask": bad_mask}], c.lik, "empirical")


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_all_positions_ignored(kind):
    c = case("lm_ignore")
    none = torch.full_like(c.Y, -100)
    with pytest.raises(ValueError, match="(?i)ignore|no .*(position|prediction)|all"):
        fl.fisher_diag(c.model, (c.X, none), c.lik, kind)
    with pytest.raises(ValueError, match="(?i)ignore|no .*(position|prediction)|all|mask"):
        fl.fisher_trace(c.model, [{"input_ids": c.X, "labels": c.Y, "mask": torch.zeros_like(c.Y, dtype=torch.bool)}],
                        c.lik, kind)


ALL_IGNORED_VIEWS = {
    "fisher_matrix": lambda m, d, lik: fl.fisher_matrix(m, d, lik),
    "fisher_blocks": lambda m, d, lik: fl.fisher_blocks(m, d, lik, what="trace"),
    "hutchinson": lambda m, d, lik: fl.fisher_diag(m, d, lik, method="hutchinson", samples=2),
    "operator": lambda m, d, lik: fl.fisher_operator(m, d, lik) @ torch.ones(sum(p.numel() for p in m.parameters())),
    "eigenvalues": lambda m, d, lik: fl.eigenvalues(m, d, lik, k=2, method="gram"),
    "spectral_density": lambda m, d, lik: fl.spectral_density(m, d, lik, probes=2, steps=3),
    "fisher_rao_norm": lambda m, d, lik: fl.fisher_rao_norm(m, d, lik),
    "fisher_ntk_trace": lambda m, d, lik: fl.fisher_ntk_trace(m, d, lik, "true"),
}


@pytest.mark.parametrize("view", list(ALL_IGNORED_VIEWS))
def test_all_positions_ignored_every_view(view):
    c = case("lm_ignore")
    with pytest.raises(ValueError, match="(?i)ignore"):
        ALL_IGNORED_VIEWS[view](c.model, (c.X, torch.full_like(c.Y, -100)), c.lik)


def test_dict_batch_without_labels():
    c = case("lm_ignore")
    with pytest.raises((ValueError, TypeError), match="(?i)label"):
        fl.fisher_diag(c.model, [{"input_ids": c.X}], c.lik, "empirical")
    # the true Fisher needs no labels: every position counts
    d = fl.fisher_diag(c.model, [{"input_ids": c.X}], c.lik, "true")
    want = ref.seq_fisher(c.model, c.X, None, "true", "categorical", what="diag")
    assert_close(d, want, RTOL, "true without labels")


def test_stock_transformer_layer_backward_views():
    """The stock nn.TransformerEncoderLayer (relu, default attention kernels) in eval mode: the views built from
    backward passes (diag) work — torch's fused eval kernels support reverse-mode AD."""
    model, X, Y = lm_case(activation="relu")
    d = fl.fisher_diag(model, (X, Y), fl.Categorical())
    assert_close(d, ref.seq_fisher(model, X, Y, "true", "categorical", what="diag"), RTOL, "diag")
    e = fl.fisher_diag(model, (X, Y), fl.Categorical(), "empirical")
    assert_close(e, ref.seq_fisher(model, X, Y, "empirical", "categorical", what="diag"), RTOL, "empirical diag")


def test_stock_transformer_layer_operator():
    """The operator on the stock layer: torch 2.13 (CPU) has no forward-mode AD for its fused eval kernels
    (``aten::_transformer_encoder_layer_fwd``, CPU flash attention), so a plain ``torch.func.jvp`` product fails;
    the library's product must not depend on one."""
    model, X, Y = lm_case(activation="relu")
    F_ref = ref.seq_fisher(model, X, Y, "true", "categorical")
    v = torch.randn(F_ref.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    assert_close(fl.fisher_operator(model, (X, Y), fl.Categorical()) @ v, F_ref @ v, RTOL, "operator")


def test_a_single_dict_is_the_whole_data():
    """data={"input": X, "labels": Y} (one dict of tensors) is split into batches like a tuple (X, Y)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    X, Y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6, 5))
    lik = fl.Categorical()
    for kind in ("true", "empirical"):
        a = fl.fisher_diag(m, {"input": X, "labels": Y}, lik, kind, batch_size=4)
        assert torch.allclose(a, fl.fisher_diag(m, (X, Y), lik, kind), rtol=1e-12)


@pytest.mark.parametrize("kind", ["true", "mc", "empirical"])
def test_labels_of_the_wrong_shape_are_refused_for_every_kind(kind):
    """The true Fisher needs no labels, but labels that are given drop positions: a shape that matches neither the
    positions nor the outputs is refused, never silently ignored."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    X, Y = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    with pytest.raises(ValueError, match=r"Labels of shape \(4, 3\)"):
        fl.fisher_trace(m, (X, Y[:, :3]), fl.Categorical(), kind)
