"""Every streamed quantity across ranks equals the single-process one on the concatenated data (docs/distributed.md).

Spawning process groups is expensive (each process imports torch), so a few groups each check many functions:
a 2-rank group, a 3-rank group with uneven shards (one rank with fewer inputs, one with none) and a group whose
collective is broken on purpose (the hang guard).  Every group runs on CPU with gloo, in float64, with a
timeout on the process group and on the join, so that a broken collective fails the test instead of stalling.
"""

from __future__ import annotations

import copy
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fisherlens as fl
from fisherlens._core import Request, collectives, rank_generator, shards_for
from fisherlens.estimators import Moments, draws

RTOL = 1e-10
PG_TIMEOUT = 60  # seconds a collective may wait before the process group raises
JOIN_TIMEOUT = 240  # seconds for a whole group, spawning included


# ----------------------------------------------------------------------------- the harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker, args: tuple, pg_timeout: float) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=pg_timeout),
    )
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_group(worker, world: int, *args, pg_timeout: float = PG_TIMEOUT, join_timeout: float = JOIN_TIMEOUT):
    """Run ``worker(rank, world, *args)`` on ``world`` spawned gloo ranks; a worker's exception fails the test (with
    its traceback), and a group still running after ``join_timeout`` seconds is killed and fails it too."""
    ctx = mp.start_processes(
        _entry, args=(world, _free_port(), worker, args, pg_timeout), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + join_timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world}-rank group did not finish within {join_timeout} s (a collective hangs?)")


# ----------------------------------------------------------------------------- the cases
N = 10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _close(a, b, what: str, rtol: float = RTOL) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], f"{what}[{k}]", rtol)
        return
    if isinstance(a, (int, float)):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-14), f"{what}: {a} != {b}"
        return
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=rtol, atol=1e-14 * max(1.0, float(b.abs().max()))), (
        f"{what}: max abs difference {float((a - b).abs().max()):.3g}"
    )


def _same_on_all_ranks(x: torch.Tensor, what: str) -> None:
    """``x`` is bit for bit the same on every rank."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    for r, p in enumerate(parts):
        assert torch.equal(p, x), f"{what}: rank {r} differs from rank {dist.get_rank()}"


def _bounds(sizes: list[int], rank: int) -> tuple[int, int]:
    a = sum(sizes[:rank])
    return a, a + sizes[rank]


def _exact(rank: int, sizes: list[int]) -> None:
    """Exact reductions, operator, spectra, bounds and natural gradient: distributed == single-process."""
    model, (X, Y) = _model(), _data()
    a, b = _bounds(sizes, rank)
    lik = fl.Categorical()
    full, shard = (X, Y), (X[a:b], Y[a:b])
    one = {"distributed": False}
    bs = {"batch_size": 3}  # several batches per rank
    for kind in ("true", "empirical"):
        _close(
            fl.fisher_matrix(model, shard, lik, kind, **bs),
            fl.fisher_matrix(model, full, lik, kind, **one),
            f"fisher_matrix {kind}",
        )
    for red in ("mean", "sum", "per_prediction"):
        _close(
            fl.fisher_diag(model, shard, lik, reduction=red, **bs),
            fl.fisher_diag(model, full, lik, reduction=red, **one),
            f"fisher_diag {red}",
        )
    _close(fl.fisher_trace(model, shard, lik, **bs), fl.fisher_trace(model, full, lik, **one), "fisher_trace")
    for what in ("diag", "trace", "dense"):
        _close(
            fl.fisher_blocks(model, shard, lik, what=what, **bs),
            fl.fisher_blocks(model, full, lik, what=what, **one),
            f"fisher_blocks {what}",
        )
    _close(fl.fisher_rao_norm(model, shard, lik, **bs), fl.fisher_rao_norm(model, full, lik, **one), "rao norm")
    for red in ("mean", "sum"):
        _close(
            fl.ntk_trace(model, shard, reduction=red, **bs),
            fl.ntk_trace(model, full, reduction=red, **one),
            f"ntk_trace {red}",
        )
    rel, ref = fl.fisher_ntk_trace(model, shard, lik, **bs), fl.fisher_ntk_trace(model, full, lik, **one)
    _close(
        [rel.fisher_trace, rel.ntk_side, rel.ntk_trace],
        [ref.fisher_trace, ref.ntk_side, ref.ntk_trace],
        "fisher_ntk_trace",
    )
    for which in ("diag", "isotropic"):
        for what in ("diag", "trace", "dense"):
            _close(
                fl.bounds.envelope(model, shard, which, what, **bs),
                fl.bounds.envelope(model, full, which, what, **one),
                f"envelope {which} {what}",
            )
    # one all-reduce per call, not per batch
    before = collectives()
    fl.fisher_diag(model, shard, lik, batch_size=1)
    assert collectives() - before == 1, "fisher_diag: one collective per call"
    _operator(model, shard, full, lik)
    _spectra(model, shard, full, lik)
    for solver in ("gram", "cg"):
        for kind in ("true", "empirical"):
            d = fl.natural_gradient(model, shard, lik, kind=kind, solver=solver, damping=1e-2, **bs)
            ref = fl.natural_gradient(model, full, lik, kind=kind, solver=solver, damping=1e-2, **one)
            _close(d.flat, ref.flat, f"natural_gradient {solver} {kind}", 1e-9)
            _close(d.loss, ref.loss, f"natural_gradient loss {solver} {kind}")
    # a DistributedDataParallel model is the model it wraps
    ddp = nn.parallel.DistributedDataParallel(model)
    _close(fl.fisher_diag(ddp, shard, lik), fl.fisher_diag(model, full, lik, **one), "fisher_diag of DDP")
    # distributed=False inside a group: this rank's data alone, no collective
    if b > a:
        before = collectives()
        _close(
            fl.fisher_trace(model, shard, lik, **one),
            float(fl.fisher_diag(model, shard, lik, **one).sum()),
            "this rank alone",
        )
        assert collectives() == before, "distributed=False: no collective"


def _operator(model, shard, full, lik) -> None:
    op, ref = (
        fl.fisher_operator(model, shard, lik, batch_size=3),
        fl.fisher_operator(model, full, lik, distributed=False),
    )
    g = torch.Generator().manual_seed(3)
    v, M = torch.randn(op.shape[0], generator=g), torch.randn(op.shape[0], 4, generator=g)
    before = collectives()
    Fv, FM = op @ v, op @ M
    assert collectives() - before == 2, "one collective per product"
    _close(Fv, ref @ v, "F v")
    _close(FM, ref @ M, "F M")
    _same_on_all_ranks(Fv, "F v")
    _same_on_all_ranks(FM, "F M")
    _close(op.to_dense(), ref.to_dense(), "to_dense")


def _spectra(model, shard, full, lik) -> None:
    one = {"distributed": False}
    for method in ("dense", "gram", "auto"):
        e = fl.eigenvalues(model, shard, lik, method=method, batch_size=3)
        _close(e, fl.eigenvalues(model, full, lik, method=method, **one), f"eigenvalues {method}", 1e-9)
    top = fl.eigenvalues(model, shard, lik, k=3, method="lanczos", tol=1e-14)
    _close(top, fl.eigenvalues(model, full, lik, k=3, method="lanczos", tol=1e-14, **one), "lanczos top-3", 1e-9)
    _same_on_all_ranks(top, "lanczos top-3")
    top1 = fl.eigenvalues(model, shard, lik, k=1, method="lanczos", tol=1e-12)  # the torch route (k = 1)
    _close(top1, top[:1], "lanczos top-1", 1e-9)
    _same_on_all_ranks(top1, "lanczos top-1")
    vals, vecs = fl.eigenvalues(model, shard, lik, method="gram", return_vectors=True)
    rv, rw = fl.eigenvalues(model, full, lik, method="gram", return_vectors=True, **one)
    _close(vals, rv, "gram eigenvalues", 1e-9)
    _close((vecs.T @ rw).abs().diagonal()[:5], torch.ones(5), "gram eigenvectors", 1e-8)
    sd = fl.spectral_density(model, shard, lik, probes=3, steps=6, generator=torch.Generator().manual_seed(5))
    ref = fl.spectral_density(model, full, lik, probes=3, steps=6, generator=torch.Generator().manual_seed(5), **one)
    _close(sd.nodes, ref.nodes, "SLQ nodes", 1e-8)
    _close(sd.weights, ref.weights, "SLQ weights", 1e-8)


def _random(rank: int, world: int, sizes: list[int]) -> None:
    """Hutchinson and MC: each rank's draws come from its own generator; the per-draw sums over the ranks are
    the estimate, and their spread over the draws its stderr — rebuilt here rank by rank in one process."""
    model, (X, Y) = _model(), _data()
    lik = fl.Categorical()
    a, b = _bounds(sizes, rank)
    shard = (X[a:b], Y[a:b])
    seed, S = 11, 5

    def per_rank_draws(method, what, per_sample):
        total = None
        for r in range(world):
            ra, rb = _bounds(sizes, r)
            if rb == ra:
                continue
            run = Request(
                model=model,
                data=(X[ra:rb], Y[ra:rb]),
                likelihood=lik,
                reduction="sum",
                batch_size=4,
                generator=rank_generator(torch.Generator().manual_seed(seed), r),
                distributed=False,
            )
            d = draws(run, method, what, samples=S, per_sample=per_sample)
            flat = torch.cat([d[n].reshape(S, -1) for n in run.fm.names], dim=1)
            total = flat if total is None else total + flat
        return total / N

    for method, per_sample in (("hutchinson", False), ("hutchinson", True), ("mc", False)):
        for what, fn in (("diag", fl.fisher_diag), ("trace", fl.fisher_trace)):
            est = fn(
                model,
                shard,
                lik,
                method=method,
                samples=S,
                per_sample=per_sample,
                batch_size=4,
                generator=torch.Generator().manual_seed(seed),
            )
            x = per_rank_draws(method, what, per_sample)
            if what == "trace":
                x = x.sum(1, keepdim=True)
            m = Moments()
            m.add(x)
            ref = m.estimate()
            value, err = torch.as_tensor(est.value).reshape(-1), torch.as_tensor(est.stderr).reshape(-1)
            _close(value, ref.value.reshape(-1), f"{method} {what} per_sample={per_sample} value")
            _close(err, ref.stderr.reshape(-1), f"{method} {what} per_sample={per_sample} stderr")
            _same_on_all_ranks(value, f"{method} {what} value")
    blocks = fl.fisher_blocks(
        model,
        shard,
        lik,
        what="dense",
        method="hutchinson",
        samples=S,
        batch_size=4,
        generator=torch.Generator().manual_seed(seed),
    )
    m = Moments()
    m.add(per_rank_draws("hutchinson", "dense", False))
    ref = m.estimate()
    _close(torch.cat([e.value.reshape(-1) for e in blocks.values()]), ref.value, "hutchinson dense blocks value")
    _close(torch.cat([e.stderr.reshape(-1) for e in blocks.values()]), ref.stderr, "hutchinson dense blocks stderr")
    # the MC Fisher (sampled labels) rebuilt the same way
    F = fl.fisher_diag(model, shard, lik, kind="mc", samples=2, generator=torch.Generator().manual_seed(seed))
    total = 0
    for r in range(world):
        ra, rb = _bounds(sizes, r)
        if rb > ra:
            total = total + fl.fisher_diag(
                model,
                (X[ra:rb], Y[ra:rb]),
                lik,
                kind="mc",
                samples=2,
                reduction="sum",
                generator=rank_generator(torch.Generator().manual_seed(seed), r),
                distributed=False,
            )
    _close(F, total / N, "kind='mc' diag")


OBSERVABLES = (
    "loss",
    "accuracy",
    "grad_norm",
    "fisher_trace",
    "ntk_trace",
    "rao_norm",
    "top_eigenvalue",
    "path_length",
    "batch_fisher_trace",
)


def _monitor(rank: int, sizes: list[int], train: list[int]) -> None:
    """A Monitor on the shards records what one on the whole probe (and the whole training batch) records; only
    rank 0 keeps the records; a mismatched step is refused on every rank instead of hanging."""
    model, (X, Y) = _model(), _data()
    twin = copy.deepcopy(model)
    a, b = _bounds(sizes, rank)
    ta, tb = _bounds(train, rank)
    Xt = torch.randn(sum(train), 3, generator=torch.Generator().manual_seed(4))
    lik = fl.Categorical()
    mon = fl.Monitor(nn.parallel.DistributedDataParallel(model), lik, (X[a:b], Y[a:b]), observables=OBSERVABLES)
    ref = fl.Monitor(twin, lik, (X, Y), observables=OBSERVABLES, distributed=False)
    got = [mon.record(0)]  # every rank gets the record; rank 0 alone keeps it
    ref.record(0)
    for m, net in ((mon, model), (ref, twin)):
        for _ in range(2):
            net(Xt[ta:tb] if m is mon else Xt)  # the training forward the batch trace captures
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.1 * torch.sin(3 * p))  # the same deterministic "optimiser step" on both copies
            rec = m.step()
            if m is mon:
                got.append(rec)
    assert len(mon.records) == (3 if rank == 0 else 0), "records on rank 0 only"
    if rank == 0:
        assert mon.records == got
    for r, e in zip(got, ref.records, strict=True):
        for c in e:
            tol = 1e-8 if c == "top_eigenvalue" else RTOL
            if c == "step" or not math.isnan(e[c]):
                _close(r[c], e[c], f"Monitor {c} at step {e['step']}", tol)
            else:
                assert math.isnan(r[c]), c
    with pytest.raises(ValueError, match="same steps"):
        mon.record(rank)  # every rank is told, none waits
    everywhere = fl.Monitor(model, lik, (X[a:b], Y[a:b]), observables=("loss",), record_on="all")
    everywhere.record(0)
    assert len(everywhere.records) == 1
    mon.close()
    ref.close()


def _optimizer(rank: int, sizes: list[int]) -> None:
    """fl.optim.NaturalGradient on the shards of each step's batch takes the step of the whole batch."""
    model, (X, Y) = _model(), _data()
    twin = copy.deepcopy(model)
    a, b = _bounds(sizes, rank)
    lik = fl.Categorical()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = fl.optim.NaturalGradient(ddp.parameters(), ddp, lik, lr="critical", damping=1e-2, adaptive_damping=True)
    ref = fl.optim.NaturalGradient(
        twin.parameters(), twin, lik, lr="critical", damping=1e-2, adaptive_damping=True, distributed=False
    )
    for _ in range(2):
        opt.step((X[a:b], Y[a:b]))
        ref.step((X, Y))
    _close(opt.damping, ref.damping, "adapted damping")
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        _close(p.detach(), q.detach(), f"NaturalGradient step: {n}", 1e-9)


def _options(rank: int, sizes: list[int]) -> None:
    """An explicit ``group=`` (ranks 0 and 1), refusals raised on every rank alike (none is left waiting)."""
    model, (X, Y) = _model(), _data()
    lik = fl.Categorical()
    a, b = _bounds(sizes, rank)
    shard = (X[a:b], Y[a:b])
    sub = dist.new_group([0, 1])  # every rank takes part in creating it
    if rank < 2:
        both = sizes[0] + sizes[1]
        ref = fl.fisher_diag(model, (X[:both], Y[:both]), lik, distributed=False)
        _close(fl.fisher_diag(model, shard, lik, group=sub), ref, "fisher_diag over group=")
    else:
        with pytest.raises(ValueError, match="not a member"):
            fl.fisher_diag(model, shard, lik, group=sub)
    with pytest.raises(ValueError, match="method='lanczos'"):  # the gathered rows would not fit
        fl.eigenvalues(model, shard, lik, method="gram", max_memory=1000)
    with pytest.raises(ValueError, match="empty on every rank"):
        fl.fisher_trace(model, (X[:0], Y[:0]), lik)


def _worker(rank: int, world: int, sizes: list[int], train: list[int]) -> None:
    _exact(rank, sizes)
    _options(rank, sizes)
    _optimizer(rank, sizes)
    _random(rank, world, sizes)
    _monitor(rank, sizes, train)


# ----------------------------------------------------------------------------- the tests
def test_two_ranks():
    run_group(_worker, 2, [6, 4], [3, 2])


def test_three_ranks_uneven_and_empty_shards():
    run_group(_worker, 3, [7, 3, 0], [2, 2, 1])


def _broken(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(30)  # never joins the collective
        return
    fl.fisher_trace(_model(), _data(), fl.Categorical())


def test_a_broken_collective_fails_instead_of_hanging():
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException):
        run_group(_broken, 2, pg_timeout=3)
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- single process
def test_single_process_options():
    assert shards_for() is None and shards_for(distributed=False) is None
    with pytest.raises(ValueError, match="init_process_group"):
        fl.fisher_trace(_model(), _data(), fl.Categorical(), distributed=True)
    with pytest.raises(ValueError, match="distributed=False"):
        shards_for(group=object(), distributed=False)
    with pytest.raises(TypeError, match="distributed must be"):
        shards_for(distributed="yes")


def test_rank_generators_are_independent_and_reproducible():
    def first(rank):
        return torch.rand(4, generator=rank_generator(torch.Generator().manual_seed(2), rank))

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    g = torch.Generator().manual_seed(2)
    assert not torch.equal(torch.rand(4, generator=rank_generator(g, 0)), torch.rand(4, generator=rank_generator(g, 0)))
