"""Random estimators stream their draws: memory is flat in ``samples``.

Deterministic evidence instead of a memory profiler: with ``fisherlens._core.WORK_BUDGET`` made small, the
probe vectors ``ξ (B, C, s)`` and the vmapped pull-back's output ``{name: (s, *shape)}`` — the blocks that
grow with the number of draws — are recorded and must never hold more than the budget's ``s`` draws, whatever
``samples`` is (up to ``10**9``, which must start streaming at once).  The streamed mean / standard error must
equal those of the stacked per-draw values, and stay unbiased with many chunks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import vmap as real_vmap

import fisherlens as fl
from fisherlens import _core, estimators
from fisherlens._core import Run

DT = torch.float64
N, C, BATCH = 9, 3, 4
COMBOS = [("diag", False), ("trace", False), ("dense", False), ("diag", True), ("trace", True)]  # no per-sample dense


class Stop(Exception):
    """Raised by the recording probe to end a (long) streamed call early."""


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(N, 4, generator=g, dtype=DT)
    return model, X, fl.Categorical()


@pytest.fixture
def record(monkeypatch):
    """Record the draws of every ``probe_vectors`` call and the numel of every vmapped pull-back output;
    ``rec["stop"] = k`` raises :class:`Stop` at the (k+1)-th probe call."""
    rec = {"draws": [], "vjp_numel": [], "stop": None}
    probe = estimators.probe_vectors

    def probe_rec(run, f, method, probe_kind, draws, generator):
        if rec["stop"] is not None and len(rec["draws"]) >= rec["stop"]:
            raise Stop
        rec["draws"].append(draws)
        return probe(run, f, method, probe_kind, draws, generator)

    def vmap_rec(fn, in_dims=0):
        def g(*args):
            out = real_vmap(fn, in_dims=in_dims)(*args)
            rec["vjp_numel"].append(sum(t.numel() for t in out.values()))
            return out

        return g

    monkeypatch.setattr(estimators, "probe_vectors", probe_rec)
    monkeypatch.setattr(estimators, "vmap", vmap_rec)
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
    budget_for(monkeypatch, limit, numel + BATCH * C)  # the batch estimator also counts ξ (B, C, s)
    peaks = {}
    for S in (3, 40, 400):
        record["draws"].clear()
        record["vjp_numel"].clear()
        fn = {"diag": fl.fisher_diag, "trace": fl.fisher_trace}.get(what)
        kw = dict(method="hutchinson", samples=S, generator=torch.Generator().manual_seed(1), batch_size=BATCH)
        e = fn(model, X, L, **kw) if fn else fl.fisher_blocks(model, X, L, what="dense", **kw)
        assert (e.samples if fn else next(iter(e.values())).samples) == S
        batches = math.ceil(N / BATCH)
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
        run = Run(model, X, L, "true", None, "mean", 1, torch.Generator().manual_seed(4), BATCH, "auto")
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
    monkeypatch.setattr(_core, "WORK_BUDGET", 8 * 40 * (P_of(model) + BATCH * C))
    kw = dict(method="hutchinson", per_sample=per_sample, samples=1500, batch_size=BATCH)
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
    run = Run(model, X, L, "true", None, "mean", 1, None, None, "auto")
    with pytest.raises(ValueError, match="numbers per draw"):
        estimators.estimate(run, "hutchinson", "dense", samples=3, max_memory=100)
    assert run.n == 0
    with pytest.raises(ValueError, match="stack of samples=1000000"):
        estimators.draws(run, "hutchinson", "diag", samples=10**6, max_memory=10**6)
