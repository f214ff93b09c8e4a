"""fl.Monitor on structured outputs (float64): a causal transformer LM (logits ``(B, T, V)``, labels ``(B, T)`` with
``-100``), a channel-first Conv1d segmentation model (``(B, C, L)``, ``fl.Categorical(channels="first")``) and a
Hugging Face-style model returning a dict (``output=``, keyword inputs, dict batches).

Every probe observable equals the corresponding ``fl.*`` call (or an autograd reference) at the same step; the
per-step batch trace (true exact, true Hutchinson — unbiased —, empirical with the usual LM losses) equals
``fl.fisher_trace`` on that training batch at θ before the step, per input and per prediction; bad input raises.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Wrapped, lm_case, seg_case

import fisherlens as fl
import fisherlens._core as core
from fisherlens import monitor as monitor_mod

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-10
#: the TinyLM parameters owned by layer rules (the attention's in-projection and the positions are raw parameters)
LM_PARAMS = ["emb", "block.linear1", "block.linear2", "block.norm1", "block.norm2", "head"]
PROBE_OBS = ("loss", "accuracy", "fisher_trace", "ntk_trace", "relation", "top_eigenvalue", "rao_norm",
             "grad_norm", "path_length")


def _case(name: str):
    """A model, a probe (3 inputs), a training batch (6 inputs), the likelihood, the batch-trace params and the
    layout.  Training batches of B = T inputs make shapes ambiguous: the monitor's separation check runs."""
    if name == "lm":  # sequences of T = 5 tokens
        model, X, Y = lm_case(seed=0, n=9, T=5)
        lik, params, first = fl.Categorical(), LM_PARAMS, False
    else:  # a Conv1d segmentation model, L = 6 positions
        model, X, Y = seg_case(seed=1, n=9, L=6, ignored=8)
        lik, params, first = fl.Categorical(channels="first"), None, True
    return SimpleNamespace(model=model, probe=(X[:3], Y[:3]), train=(X[3:], Y[3:]), lik=lik, params=params,
                           first=first)


def _flat_logits(out, first: bool):
    """``(R, C)`` rows of LM logits ``(B, T, V)`` or channel-first ``(B, C, L)`` outputs."""
    return out.movedim(1, -1).reshape(-1, out.shape[1]) if first else out.reshape(-1, out.shape[-1])


def _ce(out, y, first: bool, how: str = "token_mean"):
    """The training losses of a sequence model: mean over the kept tokens (F.cross_entropy's default), their sum,
    or the library's mean over inputs of each input's summed loss."""
    total = F.cross_entropy(_flat_logits(out, first), y.reshape(-1), reduction="sum")  # ignore_index=-100
    return {"token_mean": total / (y != -100).sum(), "sum": total, "input_mean": total / len(y)}[how]


def _step(model, opt, x, y, first, how="token_mean"):
    out = model(x)
    loss = _ce(out, y, first, how)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, out


def _close(a, b, what, rtol=RTOL):
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-13), f"{what}: monitor {a!r} != library {b!r}"


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# ----------------------------------------------------------------------------- probe observables
def _check_probe_record(rec, m, c, kind, red):
    X, Y = c.probe
    kw = {"reduction": red}
    kept = int((Y != -100).sum())
    per = len(X) if red == "mean" else kept
    with torch.no_grad():
        out = m(X)
    _close(rec["loss"], _ce(out, Y, c.first, "sum").item() / per, "loss", 1e-12)
    hit = (out.argmax(1 if c.first else -1) == Y) & (Y != -100)
    _close(rec["accuracy"], hit.sum().item() / kept, "accuracy", 1e-12)
    _close(rec["fisher_trace"], fl.fisher_trace(m, c.probe, c.lik, kind, **kw), "fisher_trace")
    _close(rec["ntk_trace"], fl.ntk_trace(m, X, reduction="mean"), "ntk_trace")
    if red == "mean":
        rel = fl.fisher_ntk_trace(m, c.probe, c.lik, kind)
        _close(rec["ntk_side"], rel.ntk_side, "ntk_side")
        _close(rec["relation_ratio"], rel.ratio, "relation_ratio")
    top = fl.eigenvalues(m, c.probe, c.lik, kind=kind, method="dense", **kw)[0].item()
    _close(rec["top_eigenvalue"], top, "top_eigenvalue", 1e-7)
    _close(rec["rao_norm"], fl.fisher_rao_norm(m, c.probe, c.lik, kind, **kw), "rao_norm")
    mp = copy.deepcopy(m).eval()
    (_ce(mp(X), Y, c.first, "sum") / per).backward()
    _close(rec["grad_norm"], torch.cat([p.grad.reshape(-1) for p in mp.parameters()]).norm().item(), "grad_norm")


@pytest.mark.parametrize("name", ["lm", "seg"])
@pytest.mark.parametrize("kind,red", [("true", "mean"), ("empirical", "mean"), ("true", "per_prediction")])
def test_probe_observables_equal_library(name, kind, red):
    c = _case(name)
    obs = PROBE_OBS if red == "mean" else tuple(o for o in PROBE_OBS if o != "relation")
    mon = fl.Monitor(c.model, c.lik, c.probe, observables=obs, every=2, kind=kind, reduction=red)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.3)
    thetas, snaps = [], []
    for s in range(1, 5):
        loss, _ = _step(c.model, opt, *c.train, c.first)
        rec = mon.step(loss=loss)
        if s % 2:
            continue
        m = c.model.eval()
        _check_probe_record(rec, m, c, kind, red)
        thetas.append(_flat(m))
        snaps.append(copy.deepcopy(m))
        deltas = [b - a for a, b in zip(thetas, thetas[1:], strict=False)]
        ref = sum(math.sqrt(d @ fl.fisher_matrix(snap, c.probe, c.lik, kind, reduction=red) @ d)
                  for d, snap in zip(deltas, snaps, strict=False))
        _close(rec["path_length"], ref, "path_length")
        m.train()
    assert mon.records[-1]["path_length"] > 0


# ----------------------------------------------------------------------------- the per-step batch trace
BATCH = [("true", "exact", "token_mean"), ("empirical", "exact", "token_mean"), ("empirical", "exact", "sum"),
         ("empirical", "exact", "input_mean")]


@pytest.mark.parametrize("name", ["lm", "seg"])
@pytest.mark.parametrize("kind,method,how", BATCH)
@pytest.mark.parametrize("red", ["mean", "per_prediction"])
@pytest.mark.parametrize("pass_loss", [True, False])
def test_batch_fisher_trace_equals_library(name, kind, method, how, red, pass_loss):
    """At θ before the step, on that batch, same normalisation; batches of two sizes (one with B = T)."""
    c = _case(name)
    mon = fl.Monitor(c.model, c.lik, c.probe, observables=("batch_fisher_trace",), kind=kind, method=method,
                     params=c.params, reduction=red)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.3)
    X, Y = c.train
    for s, (xb, yb) in enumerate([(X, Y), (X[1:], Y[1:]), (X[:4], Y[:4])], 1):
        assert (yb == -100).any()
        before = copy.deepcopy(c.model).eval()
        loss, out = _step(c.model, opt, xb, yb, c.first, how)
        rec = mon.step(loss=loss if pass_loss else None, outputs=out, targets=yb)
        want = fl.fisher_trace(before, (xb, yb), c.lik, kind, params=c.params, reduction=red)
        _close(rec["batch_fisher_trace"], want, f"step {s}")
    mon.close()


@pytest.mark.parametrize("name", ["lm", "seg"])
def test_batch_hutchinson_unbiased(name):
    """Per-position Hutchinson on structured outputs (ignored positions dropped at step()): the mean of many
    one-draw records is within a few standard errors of the exact trace."""
    c = _case(name)
    mon = fl.Monitor(c.model, c.lik, c.probe, observables=("batch_fisher_trace",), method="hutchinson",
                     params=c.params, generator=torch.Generator().manual_seed(5))
    xb, yb = c.train
    c.model.eval()
    vals = []
    for _ in range(300):
        _ce(c.model(xb), yb, c.first).backward()
        vals.append(mon.step(targets=yb)["batch_fisher_trace"])
    v = torch.tensor(vals)
    exact = fl.fisher_trace(c.model, (xb, yb), c.lik, "true", params=c.params)
    se = v.std().item() / math.sqrt(len(v))
    assert v.std() > 0 and abs(v.mean().item() - exact) < 4 * se, (v.mean().item(), exact, se)
    unmasked = fl.fisher_trace(c.model, xb, c.lik, "true", params=c.params)  # no labels: every position kept
    assert abs(unmasked - exact) > 8 * se  # the ignored positions matter at this precision


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_batch_true_chunks_positions(monkeypatch, method):
    """A working budget below one batch's columns: the positions go through several backwards, same value."""
    c = _case("lm")
    xb, yb = c.train
    want, full = {}, core.WORK_BUDGET
    for budget in (full, 1):
        monkeypatch.setattr(core, "WORK_BUDGET", budget)
        model = copy.deepcopy(c.model).eval()
        mon = fl.Monitor(model, c.lik, c.probe, observables=("batch_fisher_trace",), method=method,
                         params=c.params, generator=torch.Generator().manual_seed(2))
        calls = []
        monkeypatch.setattr(monitor_mod, "tap_grads",
                            lambda *a, calls=calls, **k: calls.append(1) or core.tap_grads(*a, **k))
        _ce(model(xb), yb, c.first).backward()
        want[budget] = (mon.step(targets=yb)["batch_fisher_trace"], len(calls))
        mon.close()
    (big, n_big), (small, n_small) = want[full], want[1]
    assert n_big == 1 and n_small == xb.shape[1]  # one backward per position with the tiny budget
    _close(small, big, "chunked")
    if method == "exact":
        _close(big, fl.fisher_trace(c.model, (xb, yb), c.lik, "true", params=c.params), "exact")


# ----------------------------------------------------------------------------- Hugging Face style
def _hf_case():
    model, X, Y = lm_case(seed=2, n=8, T=5)
    return Wrapped(model), X, Y, [f"inner.{p}" for p in LM_PARAMS]


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_hf_style_dict_outputs_keyword_inputs(kind):
    """A forward returning {"logits": ...} (output=), called with keyword inputs; dict probe and targets."""
    model, X, Y, params = _hf_case()
    lik, logits = fl.Categorical(), (lambda o: o["logits"])
    probe = [{"input_ids": X[:3], "labels": Y[:3]}]  # a list of dict batches (a bare dict: see the report)
    mon = fl.Monitor(model, lik, probe, observables=("loss", "accuracy", "fisher_trace", "batch_fisher_trace"),
                     kind=kind, output=logits, params=params)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for xb, yb in [(X[3:], Y[3:]), (X[4:], Y[4:])]:  # B = 5 = T on the first step
        before = copy.deepcopy(model).eval()
        out = model(input_ids=xb)
        loss = _ce(out["logits"], yb, False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        batch = {"input_ids": xb, "labels": yb}
        rec = mon.step(loss=loss, outputs=out, targets=batch)
        want = fl.fisher_trace(before, [batch], lik, kind, params=params, output=logits)
        _close(rec["batch_fisher_trace"], want, "batch_fisher_trace")
        model.eval()
        _close(rec["fisher_trace"], fl.fisher_trace(model, probe, lik, kind, params=params, output=logits),
               "fisher_trace")
        with torch.no_grad():
            f = model(input_ids=X[:3])["logits"]
        _close(rec["loss"], _ce(f, Y[:3], False, "input_mean").item(), "loss", 1e-12)
        model.train()
    state = mon.state_dict()
    assert "output" not in state["config"]
    mon.close()
    again = fl.Monitor(model, lik, probe, observables=("loss", "accuracy", "fisher_trace", "batch_fisher_trace"),
                       kind=kind, output=logits, params=params)
    again.load_state_dict(state)  # output= is passed again; the config agrees
    assert again.step_count == 2
    again.close()


def test_hf_style_without_output_is_a_clear_error():
    model, X, Y, params = _hf_case()
    mon = fl.Monitor(model, fl.Categorical(), (X[:3], Y[:3]), observables=("batch_fisher_trace",), params=params)
    with pytest.raises(TypeError, match="output="):
        model(input_ids=X[3:])
    mon.close()
    mon = fl.Monitor(model, fl.Categorical(), (X[:3], Y[:3]), observables=("loss",))
    with pytest.raises(TypeError, match="output="):
        mon.record(0)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    c = _case("lm")
    xb, yb = c.train
    model, lik = c.model, c.lik

    def mon_of(**kw):
        return fl.Monitor(model, lik, c.probe, observables=("batch_fisher_trace",), params=c.params, **kw)

    for kind in ("true", "empirical"):  # labels of the wrong shape: a ValueError naming the shapes
        mon = mon_of(kind=kind)
        _ce(model(xb), yb, False).backward()
        with pytest.raises(ValueError, match=r"Labels of shape \(6, 4\) do not match outputs of shape \(6, 5, 7\)"):
            mon.step(targets=yb[:, :4])
        mon.close()
    mon = mon_of()
    _ce(model(xb), yb, False).backward()
    with pytest.raises(ValueError, match=r"5 positions per input\) needs the batch's targets"):
        mon.step()
    mon.close()
    mon = mon_of(kind="empirical")  # a loss over the padded positions too: not the likelihood's loss
    F.cross_entropy(model(xb).reshape(-1, 7), yb.clamp(min=0).reshape(-1)).backward()
    with pytest.raises(ValueError, match="residual"):
        mon.step(targets=yb)
    mon.close()
    bad_probe = fl.Monitor(model, lik, (c.probe[0], c.probe[1][:, :3]), observables=("loss",))
    with pytest.raises(ValueError, match="do not match"):
        bad_probe.record(0)
    with pytest.raises(ValueError, match="reduction"):
        fl.Monitor(model, lik, c.probe, observables=("loss",), reduction="sum")
    with pytest.raises(ValueError, match="'relation'"):
        fl.Monitor(model, lik, c.probe, observables=("relation",), reduction="per_prediction")
    with pytest.raises(ValueError, match="batch_fisher_trace needs"):  # raw parameters: the positions
        fl.Monitor(model, lik, c.probe, observables=("batch_fisher_trace",))
    with pytest.raises(ValueError, match="used outside their layers"):  # the attention's out_proj
        mon = fl.Monitor(model, lik, c.probe, observables=("batch_fisher_trace",),
                         params=[*c.params, "block.self_attn.out_proj"])
        with pytest.warns(UserWarning, match="out_proj"):
            model(xb)
    mon.close()


class _FlipWhenSquare(nn.Module):
    """``(B, T, 3) → (B, T, 2)``, but with B = T its first layer runs on the sequence-first ``(T, B, 3)``: the same
    outputs, whose layer gradients are not per sample along axis 0 (the proof on ``X[:4]`` cannot see it)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        flip = x.shape[0] == x.shape[1]
        h = torch.tanh(self.lin(x.transpose(0, 1) if flip else x))
        return self.head(h.transpose(0, 1) if flip else h)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_separation_check_refuses_batch_off_axis_0(kind):
    torch.manual_seed(0)
    model = _FlipWhenSquare()
    X, Y = torch.randn(6, 5, 3), torch.randint(0, 2, (6, 5))
    mon = fl.Monitor(model, fl.Categorical(), (X[:2], Y[:2]), observables=("batch_fisher_trace",), kind=kind)
    _ce(model(X), Y, False).backward()  # B = 6 ≠ T: accepted, and exact
    _close(mon.step(targets=Y)["batch_fisher_trace"], fl.fisher_trace(model, (X, Y), fl.Categorical(), kind), "B≠T")
    with pytest.raises(ValueError, match=r"\['lin.bias', 'lin.weight'\] mix the samples along axis 0"):
        model(X[:5])
    mon.close()


@pytest.mark.parametrize("first", ["empirical", "true"])
def test_two_batch_monitors_on_one_model_stay_apart(first):
    """Two per-step monitors (empirical and exact true) on one model, created in either order and without any
    earlier verification: neither monitor's internal forwards or backwards reach the other, and each equals the
    library's trace of the training batch."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    X, Y = torch.randn(7, 5, 4, dtype=torch.float64), torch.randint(0, 3, (7, 5))
    Y[0, 3:] = -100
    lik = fl.Categorical()
    make = {k: (lambda k=k: fl.Monitor(m, lik, (X, Y), observables=("batch_fisher_trace",), kind=k))
            for k in ("empirical", "true")}
    mons = {first: make[first]()}
    other = "true" if first == "empirical" else "empirical"
    mons[other] = make[other]()
    want = {k: fl.fisher_trace(m, (X, Y), lik, k) for k in mons}
    f = m(X)
    loss = F.cross_entropy(f.reshape(-1, 3), Y.reshape(-1))
    loss.backward()
    got = {k: mon.step(loss=loss, outputs=f, targets=Y)["batch_fisher_trace"] for k, mon in mons.items()}
    for k in mons:
        _close(got[k], want[k], k)
