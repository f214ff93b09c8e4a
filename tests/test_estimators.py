"""fisherlens.estimators, the random Fisher estimators (SCIENCE §6): unbiasedness, honest standard errors, exact
single-draw variances, and draws streamed with memory flat in ``samples``.

References are independent of the library: the exact Fisher comes from per-sample Jacobians built one
``autograd.grad`` at a time (``reference.py``), and the exact distribution of one draw is obtained by enumerating
every Rademacher sign pattern (or every label combination for the MC Fisher) — no random reference.

Streaming: deterministic evidence instead of a memory profiler.  With ``fisherlens._core.WORK_BUDGET`` made small,
the probe vectors ``ξ (B, C, s)`` and the batched pull-back's output ``{name: (s, *shape)}`` — the blocks that grow
with the number of draws — are recorded and must never hold more than the budget's ``s`` draws, whatever
``samples`` is (up to ``10**9``, which must start streaming at once).  The streamed mean / standard error must
equal those of the stacked per-draw values, and stay unbiased with many chunks.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import reference
import torch
from helpers import bonferroni_z
from zoo import DT, Scaled, make_case, tanh_mlp

import fisherlens as fl
from fisherlens import _core, estimators
from fisherlens._core import Request

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT2 = math.sqrt(2.0)
CASES = ["mlp", "cnn", "bernoulli", "gauss", "free"]
ESTIMATORS = [("hutchinson", "rademacher"), ("hutchinson", "gaussian"), ("mc", "rademacher")]


@functools.cache
def case(name: str, n: int = 8, batch_size: int = 3):
    return make_case(name, seed=CASES.index(name) if name in CASES else 0, n=n, batch_size=batch_size)


@functools.cache
def exact(name: str):
    c = case(name)
    F = reference.true_fisher(c.model, c.X, c.spec)
    names = [n for n, _ in c.model.named_parameters()]
    sizes = [p.numel() for p in c.model.parameters()]
    offs = [0, *itertools.accumulate(sizes)]
    blocks = {n: F[offs[i] : offs[i + 1], offs[i] : offs[i + 1]] for i, n in enumerate(names)}
    return F, blocks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zscores(value: torch.Tensor, stderr: torch.Tensor, ref: torch.Tensor, what: str) -> torch.Tensor:
    """Check ``|value − ref| ≤ z·stderr`` entrywise (Bonferroni z); return the z-scores of the random entries.

    Entries with no randomness (stderr 0 up to round-off) must be exact.
    """
    value, stderr, ref = (torch.as_tensor(t, dtype=DT).reshape(-1) for t in (value, stderr, ref))
    assert value.shape == ref.shape == stderr.shape, what
    assert torch.isfinite(value).all() and torch.isfinite(stderr).all() and (stderr >= 0).all(), what
    scale = float(ref.abs().max()) + 1e-300
    atol = 1e-9 * scale
    z = bonferroni_z(value.numel()) + 0.5
    bad = (value - ref).abs() > z * stderr + atol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{value.numel()} entries off by more than {z:.2f} stderr; worst z="
        f"{float(((value - ref).abs() / (stderr + atol)).max()):.2f}"
    )
    random = stderr > atol
    return ((value - ref) / stderr)[random]


def check_honest(z: torch.Tensor, what: str) -> None:
    """The z-scores of an honest standard error have mean square ≈ 1 (entries are correlated: loose band)."""
    if z.numel() >= 5:
        rms = float(z.square().mean().sqrt())
        assert 0.3 < rms < 2.0, f"{what}: root-mean-square z = {rms:.3f}; the reported stderr is not honest"


# ----------------------------------------------------------------------------- 1. unbiasedness
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize(("method", "probe"), ESTIMATORS, ids=["rademacher", "gaussian", "mc"])
@pytest.mark.parametrize("name", CASES)
def test_unbiased_diag_trace_blocks(name, method, probe, per_sample):
    c = case(name)
    F, blocks = exact(name)
    S = 1000
    kw = dict(method=method, probe=probe, per_sample=per_sample, samples=S, batch_size=c.batch_size)
    tag = f"{name}/{method}/{probe}/{'per_sample' if per_sample else 'batch'}"

    d = fl.fisher_diag(c.model, c.data, c.lik, generator=gen(1), **kw)
    assert isinstance(d, fl.Estimate) and d.samples == S and d.value.shape == (F.shape[0],)
    z_all = [zscores(d.value, d.stderr, torch.diagonal(F), f"{tag} diag")]

    t = fl.fisher_trace(c.model, c.data, c.lik, generator=gen(2), **kw)
    assert isinstance(t, fl.Estimate) and isinstance(t.value, float) and isinstance(t.stderr, float)
    zscores(t.value, t.stderr, torch.trace(F), f"{tag} trace")

    # per-layer views: same draws (same seed) as the flat estimates, so they must agree exactly
    bd = fl.fisher_blocks(c.model, c.data, c.lik, what="diag", generator=gen(1), **kw)
    bt = fl.fisher_blocks(c.model, c.data, c.lik, what="trace", generator=gen(2), **kw)
    assert list(bd) == list(blocks) == list(bt)
    tiny = 1e-13 * float(torch.diagonal(F).max())
    torch.testing.assert_close(torch.cat([bd[n].value.reshape(-1) for n in blocks]), d.value, rtol=1e-12, atol=tiny)
    torch.testing.assert_close(torch.cat([bd[n].stderr.reshape(-1) for n in blocks]), d.stderr, rtol=1e-9, atol=tiny)
    assert math.isclose(math.fsum(bt[n].value for n in blocks), t.value, rel_tol=1e-12)
    for n, B in blocks.items():
        assert bd[n].value.shape == dict(c.model.named_parameters())[n].shape
        zscores(bt[n].value, bt[n].stderr, torch.trace(B), f"{tag} block trace {n}")

    if not per_sample:
        bk = fl.fisher_blocks(c.model, c.data, c.lik, what="dense", generator=gen(5), **kw)
        for n, B in blocks.items():
            assert bk[n].value.shape == B.shape
            torch.testing.assert_close(bk[n].value, bk[n].value.T, rtol=0, atol=1e-14)
            z_all.append(zscores(bk[n].value, bk[n].stderr, B, f"{tag} dense block {n}"))
    else:
        with pytest.raises(ValueError, match="per_sample"):
            fl.fisher_blocks(c.model, c.data, c.lik, what="dense", generator=gen(5), **kw)
    z = torch.cat(z_all)
    if name == "bernoulli" and per_sample and probe == "rademacher" and method == "hutchinson":
        # one output and one sample per square: (J_nᵀ S_n ε)² = J_n² S_n² exactly
        assert z.numel() == 0
    check_honest(z, tag)


def test_every_batch_counts():
    """Regression (a previous bug kept only the first batch): batch sizes 1…N all estimate F, and the estimate is
    far from what the first batch alone would give (divided by N or by its own size)."""
    c = case("mlp")
    F, _ = exact("mlp")
    N = len(c.X)
    for bs in (1, 2, 5, 8, 100):
        for per_sample in (False, True):
            d = fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", samples=1500, generator=gen(bs),
                               batch_size=bs, per_sample=per_sample)
            zscores(d.value, d.stderr, torch.diagonal(F), f"batch_size={bs}")
            if bs < N:
                R = reference.factor_rows(c.model, c.X[:bs], c.spec)
                for first_only in (R.square().sum(0) / N, R.square().sum(0) / bs):
                    assert float(((d.value - first_only).abs() / d.stderr).max()) > 8


def test_dataloader_and_list_of_batches():
    c = case("cnn")
    F, _ = exact("cnn")
    ds = torch.utils.data.TensorDataset(c.X, c.Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    batches = [(c.X[i : i + 2], c.Y[i : i + 2]) for i in range(0, len(c.X), 2)]
    for data, method in ((loader, "hutchinson"), (batches, "mc"), (ds, "hutchinson")):
        d = fl.fisher_diag(c.model, data, c.lik, method=method, samples=1000, generator=gen(7), batch_size=3)
        zscores(d.value, d.stderr, torch.diagonal(F), f"{type(data).__name__}/{method}")
        t = fl.fisher_trace(c.model, data, c.lik, method=method, samples=1000, generator=gen(8), per_sample=True)
        zscores(t.value, t.stderr, torch.trace(F), f"{type(data).__name__}/{method} trace")


@pytest.mark.parametrize("method", ["hutchinson", "mc"])
def test_stderr_is_honest_over_independent_repetitions(method):
    """R independent estimates of tr F: their spread matches the stderr each one reports, and the z-scores
    (value − tr F)/stderr have mean square ≈ 1."""
    c = case("gauss") if method == "hutchinson" else case("mlp")
    tr = float(torch.trace(exact(c.name)[0]))
    R, S = 60, 200
    vals, errs = [], []
    for r in range(R):
        e = fl.fisher_trace(c.model, c.data, c.lik, method=method, samples=S, generator=gen(1000 + r))
        vals.append(e.value)
        errs.append(e.stderr)
    vals, errs = torch.tensor(vals, dtype=DT), torch.tensor(errs, dtype=DT)
    assert abs(float(vals.mean()) - tr) < 4.5 * float(vals.std()) / math.sqrt(R)
    ratio = float(vals.std()) / float(errs.square().mean().sqrt())
    assert 0.7 < ratio < 1.4, ratio
    rms = float(((vals - tr) / errs).square().mean().sqrt())
    assert 0.7 < rms < 1.45, rms


# ----------------------------------------------------------------------------- Estimate API and errors
def test_estimate_behaves_like_its_value():
    c = case("mlp")
    d = fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", samples=4, generator=gen(0))
    t = fl.fisher_trace(c.model, c.data, c.lik, method="hutchinson", samples=4, generator=gen(0))
    assert float(t) == t.value and t.samples == 4 and t.stderr > 0
    assert math.isclose(t + 1.0, t.value + 1.0) and math.isclose(2.0 * t, 2 * t.value)
    assert math.isclose(t / 2, t.value / 2) and math.isclose(1 - t, 1 - t.value) and (t > 0) is True
    torch.testing.assert_close(torch.sqrt(d), d.value.sqrt())
    torch.testing.assert_close(d * 2, d.value * 2)
    torch.testing.assert_close(torch.stack([d, d]), torch.stack([d.value, d.value]))
    assert d.shape == d.value.shape and len(d) == len(d.value) and float(d[0]) == float(d.value[0])
    assert f"{t:.3f}" == f"{t.value:.3f}" and "Estimate" in repr(t) and "Estimate" in repr(d)
    # the trace estimate is the sum of the diagonal estimate (same draws: same seed)
    assert math.isclose(float(d.value.sum()), t.value, rel_tol=1e-12)
    one = fl.fisher_trace(c.model, c.data, c.lik, method="hutchinson", samples=1, generator=gen(0))
    assert one.samples == 1 and math.isnan(one.stderr)
    import numpy as np

    np.testing.assert_array_equal(np.asarray(d), d.value.numpy())
    assert np.asarray(t) == t.value


def test_params_subset():
    c = case("cnn")
    F, blocks = exact("cnn")
    sel = ["conv.weight", "head.bias"]
    ref = torch.cat([torch.diagonal(blocks[n]) for n in sel])
    for method in ("hutchinson", "mc"):
        d = fl.fisher_diag(c.model, c.data, c.lik, method=method, params=sel, samples=1000, generator=gen(9),
                           batch_size=c.batch_size)
        assert d.value.shape == ref.shape
        zscores(d.value, d.stderr, ref, f"params subset ({method})")


def test_reproducible_and_reduction_sum():
    c = case("free")
    kw = dict(method="hutchinson", samples=50, batch_size=3)
    a = fl.fisher_diag(c.model, c.data, c.lik, generator=gen(3), **kw)
    b = fl.fisher_diag(c.model, c.data, c.lik, generator=gen(3), **kw)
    o = fl.fisher_diag(c.model, c.data, c.lik, generator=gen(4), **kw)
    s = fl.fisher_diag(c.model, c.data, c.lik, generator=gen(3), reduction="sum", **kw)
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    assert not torch.equal(a.value, o.value)
    torch.testing.assert_close(s.value, a.value * len(c.X), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.stderr, a.stderr * len(c.X), rtol=1e-12, atol=0)


def test_estimators_refuse_other_kinds_and_bad_arguments():
    c = case("mlp")
    for method in ("hutchinson", "mc"):
        for kind in ("empirical", "mc"):
            for fn in (fl.fisher_diag, fl.fisher_trace):
                with pytest.raises(ValueError, match="true"):
                    fn(c.model, c.data, c.lik, kind, method=method, samples=3)
            with pytest.raises(ValueError, match="true"):
                fl.fisher_blocks(c.model, c.data, c.lik, kind, what="diag", method=method, samples=3)
    with pytest.raises(ValueError):
        fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", probe="cauchy", samples=3)
    with pytest.raises(ValueError):
        fl.fisher_diag(c.model, c.data, c.lik, method="sketch", samples=3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="samples"):
            fl.fisher_trace(c.model, c.data, c.lik, method="hutchinson", samples=bad)
    with pytest.raises(TypeError):
        fl.fisher_diag(c.model, c.data, c.lik, method="mc", samples=3, generator=1234)
    with pytest.raises(ValueError):
        fl.fisher_diag(c.model, c.data, fl.LossInduced(lambda f, y: (f - y).square().sum(-1)), method="mc")


def test_output_models_refuse_the_wrong_number_of_outputs():
    """A softmax over one logit is constant (π = 1, Λ = 0): Categorical needs C ≥ 2, and the estimators must say
    so rather than return an identically zero Fisher.  Several logits under Bernoulli are independent labels
    (multi-label): the estimate is unbiased for the exact multi-label Fisher."""
    one, three = case("bernoulli"), case("mlp")
    for method in ("hutchinson", "mc"):
        for per_sample in (False, True):
            with pytest.raises(ValueError, match="Categorical"):
                fl.fisher_trace(one.model, one.X, fl.Categorical(), method=method, samples=3, per_sample=per_sample)
    exact = fl.fisher_trace(three.model, three.X, fl.Bernoulli())
    est = fl.fisher_trace(three.model, three.X, fl.Bernoulli(), method="hutchinson", samples=400,
                          generator=torch.Generator().manual_seed(0))
    assert abs(est.value - exact) < 5 * est.stderr


def test_estimates_are_detached_with_a_params_subset():
    """Results are plain tensors: with params= selecting some parameters, the others (still requires_grad=True
    in the module) must not leave the estimates attached to an autograd graph."""
    c = case("mlp")
    sel = ["0.weight"]
    for method in ("hutchinson", "mc"):
        for per_sample in (False, True):
            d = fl.fisher_diag(c.model, c.data, c.lik, method=method, params=sel, samples=3, per_sample=per_sample)
            assert not d.value.requires_grad and not d.stderr.requires_grad, (method, per_sample)
            d.value.numpy()
        b = fl.fisher_blocks(c.model, c.data, c.lik, what="dense", method=method, params=sel, samples=3)
        assert not any(v.value.requires_grad for v in b.values()), method


# ----------------------------------------------------------------------------- 2. exact single-draw laws
def sign_patterns(m: int) -> torch.Tensor:
    return (((torch.arange(2**m)[:, None] >> torch.arange(m)) & 1) * 2 - 1).to(DT)


def groups_of(N: int, K: int, batch_size: int | None, per_sample: bool) -> list[list[int]]:
    """Row indices of Ĵ (sample-major, K rows per sample) that share one squared sum in a draw."""
    size = 1 if per_sample else (batch_size or N)
    return [list(range(b * K, min(b + size, N) * K)) for b in range(0, N, size)]


def rademacher_law(A: torch.Tensor, groups, N: int):
    """Exact mean, central moments μ2, μ3, μ4 of one draw ``X = Σ_g (Σ_{i∈g} a_i ε_i)² / N`` for every column of
    ``A (m, P)``, by enumerating all 2^m sign patterns."""
    eps = sign_patterns(A.shape[0])
    X = sum((eps[:, g] @ A[g]).square() for g in groups) / N  # (2^m, P)
    mean = X.mean(0)
    c = X - mean
    return mean, c.square().mean(0), c.pow(3).mean(0), c.pow(4).mean(0)


def gaussian_law(A: torch.Tensor, groups, N: int):
    """The same for Gaussian ε: ``X = Σ_g s_g χ²_1 / N`` with ``s_g = Σ_{i∈g} a_i²`` (cumulants 2^{r-1}(r-1)! s^r)."""
    s = torch.stack([A[g].square().sum(0) for g in groups]) / N
    k2, k3, k4 = 2 * s.square().sum(0), 8 * s.pow(3).sum(0), 48 * s.pow(4).sum(0)
    return s.sum(0), k2, k3, k4 + 3 * k2.square()


def cv_and_se(mean, mu2, mu3, mu4, S: int):
    """The CV σ/μ of one draw and (delta method) the standard error of the sample CV over S draws."""
    var_v, var_m, cov = (mu4 - mu2.square()) / S, mu2 / S, mu3 / S
    sd = mu2.clamp_min(0).sqrt()
    dv, dm = 1 / (2 * mean * sd.clamp_min(1e-300)), -sd / mean.square()
    se = (dv.square() * var_v + dm.square() * var_m + 2 * dv * dm * cov).clamp_min(0).sqrt()
    return sd / mean, se


def test_rademacher_variance_closed_form_matches_enumeration():
    """SCIENCE §6: Var v_p² = 2(Σa²)² − 2Σa⁴ (per independent batch), checked against all sign patterns."""
    for name, n in (("mlp", 4), ("bernoulli", 8), ("gauss", 6), ("cnn", 4)):
        c = make_case(name, n=n)
        A = reference.factor_rows(c.model, c.X, c.spec)  # column p is the vector a of entry p
        K = A.shape[0] // n
        for groups in (groups_of(n, K, None, False), groups_of(n, K, 2, False), groups_of(n, K, None, True)):
            mean, mu2, _, _ = rademacher_law(A, groups, n)
            closed = sum(2 * A[g].square().sum(0).square() - 2 * A[g].pow(4).sum(0) for g in groups) / n**2
            torch.testing.assert_close(mu2, closed, rtol=1e-9, atol=1e-14 * float(mean.max()) ** 2)
            torch.testing.assert_close(mean, A.square().sum(0) / n, rtol=1e-12, atol=0)  # unbiased for diag F
            ok = mean > 0
            assert (mu2[ok].sqrt() / mean[ok] <= ROOT2 * (1 + 1e-9)).all()


CV_CASES = [("mlp", 4), ("bernoulli", 8), ("gauss", 6), ("free", 4)]
CV_LAYOUTS = [(None, False), (2, False), (None, True)]


@pytest.mark.parametrize(("batch_size", "per_sample"), CV_LAYOUTS, ids=["one_batch", "batches_of_2", "per_sample"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize(("name", "n"), CV_CASES, ids=[c for c, _ in CV_CASES])
def test_single_draw_cv_and_variance(name, n, probe, batch_size, per_sample):
    """Per diagonal entry, the sample CV (= stderr·√S / value) and sample variance (= stderr²·S) of the library's
    draws match their exact values within the sampling error; CV ≤ √2 (Rademacher), = √2 (Gaussian, one batch)."""
    c = make_case(name, n=n)
    A = reference.factor_rows(c.model, c.X, c.spec)
    K = A.shape[0] // n
    groups = groups_of(n, K, batch_size, per_sample)
    law = rademacher_law if probe == "rademacher" else gaussian_law
    mean, mu2, mu3, mu4 = law(A, groups, n)
    S = 3000
    e = fl.fisher_diag(c.model, c.data, c.lik, method="hutchinson", probe=probe, per_sample=per_sample, samples=S,
                       generator=gen(11), batch_size=batch_size)
    F = reference.true_fisher(c.model, c.X, c.spec)
    torch.testing.assert_close(mean, torch.diagonal(F), rtol=1e-10, atol=1e-15)
    random = mu2 > 1e-20 * float(mean.max()) ** 2
    z = bonferroni_z(2 * int(random.sum())) + 1.0
    cv_hat = e.stderr * math.sqrt(S) / e.value
    cv, se = cv_and_se(mean, mu2, mu3, mu4, S)
    assert (cv[random] <= ROOT2 * (1 + 1e-9)).all()
    if probe == "gaussian" and len(groups) == 1:
        torch.testing.assert_close(cv[random], torch.full_like(cv[random], ROOT2))
    bad = (cv_hat - cv).abs() > z * se + 1e-6
    assert not bad[random].any(), f"sample CV {cv_hat[bad]} vs exact {cv[bad]} ± {se[bad]}"
    assert (cv_hat[random] <= ROOT2 + z * se[random]).all()
    assert (cv_hat[~random].abs() < 1e-5).all()  # no randomness: every draw is exact
    # variance of one draw: sample variance vs exact, SE of a sample variance = √((μ4 − μ2²(S−3)/(S−1))/S)
    var_hat = e.stderr.square() * S
    se_var = ((mu4 - mu2.square() * (S - 3) / (S - 1)) / S).clamp_min(0).sqrt()
    bad = (var_hat - mu2).abs() > z * se_var + 1e-12 * float(mean.max()) ** 2
    assert not bad.any(), f"sample variance {var_hat[bad]} vs exact {mu2[bad]} ± {se_var[bad]}"


def mc_law(model, X, S_rows=None):
    """Exact law of one MC draw ``X_p = (Σ_n J_nᵀ (π_n − e_{y_n}))_p² / N`` (one label per input) for a
    Categorical model, by enumerating all C^N label combinations with their probabilities."""
    J = reference.jacobians(model, X)  # (N, C, P)
    N, C, _ = J.shape
    pi = torch.softmax(reference.outputs(model, X), -1)
    mean = mu2 = mu3 = mu4 = 0
    draws, probs = [], []
    for ys in itertools.product(range(C), repeat=N):
        r = pi.clone()
        r[torch.arange(N), list(ys)] -= 1
        g = torch.einsum("nc,ncp->p", r, J)
        draws.append(g.square() / N)
        probs.append(float(torch.prod(pi[torch.arange(N), list(ys)])))
    D, w = torch.stack(draws), torch.tensor(probs, dtype=DT)[:, None]
    mean = (w * D).sum(0)
    cen = D - mean
    mu2, mu3, mu4 = ((w * cen**k).sum(0) for k in (2, 3, 4))
    return mean, mu2, mu3, mu4


def test_mc_fisher_cv_exceeds_root2_on_a_peaked_classifier_while_hutchinson_stays_below():
    c = make_case("mlp", seed=0, n=5)
    model = Scaled(c.model, 3.0)  # logits ×3: max softmax probability > 0.99 on every input
    pi = torch.softmax(reference.outputs(model, c.X), -1)
    assert float(pi.max(-1).values.min()) > 0.99
    F = reference.true_fisher(model, c.X, c.spec)
    mean, mu2, mu3, mu4 = mc_law(model, c.X)
    torch.testing.assert_close(mean, torch.diagonal(F), rtol=1e-9, atol=1e-18)  # the MC Fisher is unbiased
    cv_mc = mu2.sqrt() / mean
    assert float((cv_mc > ROOT2).double().mean()) > 0.9, cv_mc  # the exact MC CV exceeds √2 ...
    assert float(cv_mc.median()) > 3 * ROOT2  # ... by a wide margin
    S = 4000
    e_mc = fl.fisher_diag(model, c.X, c.lik, method="mc", samples=S, generator=gen(5))
    e_h = fl.fisher_diag(model, c.X, c.lik, method="hutchinson", samples=S, generator=gen(5))
    cv_mc_hat = e_mc.stderr * math.sqrt(S) / e_mc.value
    cv_h_hat = e_h.stderr * math.sqrt(S) / e_h.value
    assert float((cv_mc_hat > ROOT2).double().mean()) > 0.8, cv_mc_hat
    A = reference.factor_rows(model, c.X, c.spec)
    hm, h2, h3, h4 = rademacher_law(A, groups_of(5, 3, None, False), 5)
    cv_h, se_h = cv_and_se(hm, h2, h3, h4, S)
    assert (cv_h <= ROOT2 * (1 + 1e-9)).all()
    assert (cv_h_hat <= ROOT2 + (bonferroni_z(len(cv_h)) + 1) * se_h).all(), cv_h_hat
    # the peaked MC estimate is much noisier than Hutchinson's for the same number of draws
    assert float((e_mc.stderr / e_mc.value).median()) > 3 * float((e_h.stderr / e_h.value).median())


# ----------------------------------------------------------------------------- streamed draws: memory flat in samples
STREAM_N, STREAM_C, STREAM_BATCH = 9, 3, 4
COMBOS = [("diag", False), ("trace", False), ("dense", False), ("diag", True), ("trace", True)]  # no per-sample dense


class Stop(Exception):
    """Raised by the recording probe to end a (long) streamed call early."""


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    model = tanh_mlp(4, 5, STREAM_C).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(STREAM_N, 4, generator=g, dtype=DT)
    return model, X, fl.Categorical()


@pytest.fixture
def record(monkeypatch):
    """Record the draws of every ``probe_vectors`` call and the numel of every (batched) pull-back output;
    ``rec["stop"] = k`` raises :class:`Stop` at the (k+1)-th probe call."""
    rec = {"draws": [], "vjp_numel": [], "stop": None}
    probe = estimators.probe_vectors

    def probe_rec(run, f, method, probe_kind, draws, generator, y=None):
        if rec["stop"] is not None and len(rec["draws"]) >= rec["stop"]:
            raise Stop
        rec["draws"].append(draws)
        return probe(run, f, method, probe_kind, draws, generator, y)

    real_pullback = estimators.pullback_checked

    def pullback_rec(fm, X):
        f, pull = real_pullback(fm, X)

        def recorded(u):
            out = pull(u)
            rec["vjp_numel"].append(sum(t.numel() for t in out.values()))
            return out

        return f, recorded

    monkeypatch.setattr(estimators, "probe_vectors", probe_rec)
    monkeypatch.setattr(estimators, "pullback_checked", pullback_rec)
    return rec


def budget_for(monkeypatch, draws: int, numel: int) -> int:
    """Set WORK_BUDGET so that ``draws`` draws of ``numel`` float64 numbers fit (and not one more)."""
    budget = 8 * numel * draws + 8 * numel // 2
    monkeypatch.setattr(_core, "WORK_BUDGET", budget)
    return budget


def P_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("what", ["diag", "trace", "dense"])
def test_batch_estimator_blocks_are_flat_in_samples(setup, record, monkeypatch, what):
    model, X, L = setup
    P = P_of(model)
    numel = P + (sum(p.numel() ** 2 for p in model.parameters()) if what == "dense" else 0)
    limit = 4
    budget_for(monkeypatch, limit, numel + STREAM_BATCH * STREAM_C)  # the batch estimator also counts ξ (B, C, s)
    peaks = {}
    for S in (3, 40, 400):
        record["draws"].clear()
        record["vjp_numel"].clear()
        fn = {"diag": fl.fisher_diag, "trace": fl.fisher_trace}.get(what)
        kw = dict(method="hutchinson", samples=S, generator=torch.Generator().manual_seed(1), batch_size=STREAM_BATCH)
        e = fn(model, X, L, **kw) if fn else fl.fisher_blocks(model, X, L, what="dense", **kw)
        assert (e.samples if fn else next(iter(e.values())).samples) == S
        batches = math.ceil(STREAM_N / STREAM_BATCH)
        assert sum(record["draws"]) == S * batches  # every draw sees every batch once
        assert max(record["draws"]) <= limit
        assert max(record["vjp_numel"], default=0) <= limit * P
        peaks[S] = (max(record["draws"]), max(record["vjp_numel"], default=0))
    assert peaks[40] == peaks[400]  # flat: ten times the draws, the same largest blocks


@pytest.mark.parametrize("what", ["diag", "trace"])
def test_per_sample_estimator_chunks_its_probe_vectors(setup, record, monkeypatch, what):
    model, X, L = setup
    P = P_of(model)
    budget_for(monkeypatch, 5, P)
    fn = fl.fisher_diag if what == "diag" else fl.fisher_trace
    for S in (7, 300):
        record["draws"].clear()
        e = fn(model, X, L, method="hutchinson", per_sample=True, samples=S, generator=torch.Generator().manual_seed(2))
        assert e.samples == S
        assert max(record["draws"]) <= 5
        assert sum(record["draws"]) >= S


@pytest.mark.parametrize(("what", "per_sample"), COMBOS)
def test_a_billion_draws_start_streaming_without_allocating(setup, record, monkeypatch, what, per_sample):
    """samples=10**9 is neither refused nor allocated up front: the first chunks hold the budget's draws."""
    model, X, L = setup
    monkeypatch.setattr(_core, "WORK_BUDGET", 2**16)
    record["stop"] = 3
    kw = dict(method="mc", samples=10**9, per_sample=per_sample, generator=torch.Generator().manual_seed(3))
    with pytest.raises(Stop):
        if what == "dense":
            fl.fisher_blocks(model, X, L, what="dense", **kw)
        else:
            (fl.fisher_diag if what == "diag" else fl.fisher_trace)(model, X, L, **kw)
    assert len(record["draws"]) == 3 and max(record["draws"]) <= 2**16 // (8 * P_of(model))


@pytest.mark.parametrize(("what", "per_sample"), COMBOS)
def test_streamed_moments_equal_the_stacked_draws(setup, monkeypatch, what, per_sample):
    """Chan's merge over many chunks gives the two-pass mean and stderr of all draws (same random stream)."""
    model, X, L = setup
    monkeypatch.setattr(_core, "WORK_BUDGET", 8 * 3 * (P_of(model) + 200))  # a few draws per chunk
    out = {}
    for how in ("stack", "stream"):
        run = Request(model=model, data=X, likelihood=L, generator=torch.Generator().manual_seed(4),
                      batch_size=STREAM_BATCH)
        kw = dict(probe="gaussian", per_sample=per_sample, samples=101)
        if how == "stack":
            d = estimators.draws(run, "hutchinson", what, **kw)
            out[how] = {n: fl.Estimate.from_draws(v, scalar=what == "trace") for n, v in d.items()}
        else:
            out[how] = estimators.estimate(run, "hutchinson", what, **kw)
    assert estimators.draws_per_chunk(run.fm, what, 101) < 101
    for n, a in out["stack"].items():
        b = out["stream"][n]
        assert a.samples == b.samples == 101
        torch.testing.assert_close(torch.as_tensor(b.value), torch.as_tensor(a.value), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(torch.as_tensor(b.stderr), torch.as_tensor(a.stderr), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("per_sample", [False, True])
def test_many_chunks_stay_unbiased(setup, monkeypatch, per_sample):
    model, X, L = setup
    exact = fl.fisher_diag(model, X, L)
    tr = float(exact.sum())
    monkeypatch.setattr(_core, "WORK_BUDGET", 8 * 40 * (P_of(model) + STREAM_BATCH * STREAM_C))
    kw = dict(method="hutchinson", per_sample=per_sample, samples=1500, batch_size=STREAM_BATCH)
    d = fl.fisher_diag(model, X, L, generator=torch.Generator().manual_seed(5), **kw)
    z = (d.value - exact) / d.stderr
    assert float(z.abs().max()) < 4.5 and 0.2 < float(z.square().mean()) < 3.0
    t = fl.fisher_trace(model, X, L, generator=torch.Generator().manual_seed(6), **kw)
    assert abs(t.value - tr) < 4.5 * t.stderr and t.stderr < 0.2 * tr


def test_one_shot_data_is_refused_before_reading_when_several_passes_are_needed(setup, monkeypatch):
    model, X, L = setup
    touched = []

    def stream():
        touched.append(1)
        yield X, None

    monkeypatch.setattr(_core, "WORK_BUDGET", 8 * 4 * P_of(model))
    with pytest.raises(TypeError, match="one-shot iterator"):
        fl.fisher_diag(model, stream(), L, method="hutchinson", samples=50)
    assert touched == []
    one = fl.fisher_diag(model, stream(), L, method="hutchinson", samples=2)  # a single chunk: one pass is enough
    assert one.samples == 2 and touched == [1]


def test_one_draw_that_cannot_fit_is_refused_before_reading(setup):
    model, X, L = setup
    run = Request(model=model, data=X, likelihood=L)
    with pytest.raises(ValueError, match="numbers per draw"):
        estimators.estimate(run, "hutchinson", "dense", samples=3, max_memory=100)
    assert run.n == 0
    with pytest.raises(ValueError, match="stack of samples=1000000"):
        estimators.draws(run, "hutchinson", "diag", samples=10**6, max_memory=10**6)
