"""The language-model study (``fisherlens run lm-fisher``): the standard-library corpus is deterministic (also in a
fresh interpreter), the windows cover every next-token prediction once, the transformer is causal, the naive float64
diagonal equals a dense Jacobian and the library, the two per-step monitors agree with the library, and the quick
run end to end with its checks (per-token vs per-sequence normalisation, naive loop, λ_max ≤ tr F) as assertions."""

from __future__ import annotations

import csv
import inspect
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import fisherlens as fl
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS, STUDIES
from fisherlens.experiments import lm_fisher as lm

FIGURES = ["lm_fisher_training.png", "lm_fisher_layers.png", "lm_fisher_hutchinson.png", "lm_fisher_spectrum.png"]


# ----------------------------------------------------------------------------- corpus, vocabulary, sequences
def test_corpus_is_deterministic_and_ordered():
    docs = lm.stdlib_corpus()
    assert docs == lm.stdlib_corpus()
    assert len(docs) > 500 and sum(map(len, docs)) > 100_000
    assert all(d and d == d.strip("\n") for d in docs) and len(set(docs)) == len(docs)
    i = docs.index(inspect.cleandoc(json.__doc__))  # the module's own docstring, then its functions' (sorted)
    a, b = docs.index(inspect.cleandoc(json.dumps.__doc__)), docs.index(inspect.cleandoc(json.loads.__doc__))
    assert i < a < b
    # a fresh interpreter (other import order, no state of this process) gives the same corpus
    code = "from fisherlens.experiments import lm_fisher as lm; print(lm.corpus_digest(lm.stdlib_corpus()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == lm.corpus_digest(docs)


def test_corpus_refuses_a_missing_module():
    with pytest.raises(ValueError, match="cannot be imported"):
        lm.stdlib_corpus(("json", "no_such_module_xyz"))


def test_vocab_ranks_by_frequency_then_code_point():
    v = lm.build_vocab(["aab", "bcc", "d"], 3)
    assert v.chars == "abc" and v.size == 4 and v.unk == 3  # a, b, c twice each (ties by code point), d dropped
    assert v.encode("abcd").tolist() == [0, 1, 2, 3] and v.decode([2, 3, 0]) == "c?a"


def test_sequences_cover_every_prediction_once():
    v = lm.Vocab("abcdefgxyz")
    X, Y = lm.make_sequences(["abcdefg", "xy", "z"], v, 3)
    assert X.tolist() == [v.encode("abc").tolist(), v.encode("def").tolist(), [v.encode("x")[0], v.unk, v.unk]]
    assert Y.tolist() == [v.encode("bcd").tolist(), v.encode("efg").tolist(), [v.encode("y")[0], -100, -100]]
    assert lm.kept_per_sequence(Y) == 7 / 3
    # the real corpus: the kept labels of a document's windows are the document without its first character
    docs = lm.stdlib_corpus()[:40]
    v = lm.build_vocab(docs, 64)
    X, Y = lm.make_sequences(docs, v, 32)
    assert int((Y != lm.IGNORE).sum()) == sum(len(d) - 1 for d in docs)
    labels = Y[Y != lm.IGNORE]
    assert labels.tolist() == torch.cat([v.encode(d)[1:] for d in docs]).tolist()
    assert ((X[:, 1:] == Y[:, :-1]) | (Y[:, 1:] == lm.IGNORE)).all()  # inputs are the labels shifted by one


def test_select_few_mixes_full_and_padded_sequences():
    Y = torch.zeros(10, 4, dtype=torch.long)
    Y[[2, 5, 7], 3:] = lm.IGNORE
    assert lm.select_few(Y, 4).tolist() == [0, 1, 2, 5]
    assert lm.select_few(Y, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # only 3 padded: full ones fill in
    assert lm.select_few(Y[[0, 1]], 2).tolist() == [0, 1]


# ----------------------------------------------------------------------------- model and reference
def _tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = lm.CharTransformer(5, 4, d_model=4, heads=2, layers=1, d_ff=6).to(dtype).eval()
    X = torch.randint(0, 5, (3, 4))
    Y = torch.randint(0, 5, (3, 4))
    Y[1, 2:] = lm.IGNORE
    return model, X, Y


def test_model_is_causal():
    torch.manual_seed(0)
    model = lm.CharTransformer(9, 8, d_model=8, heads=2, layers=2, d_ff=16).eval()
    x = torch.randint(0, 9, (2, 8))
    f = model(x)
    assert f.shape == (2, 8, 9)
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 9
    g = model(y)
    torch.testing.assert_close(f[:, :5], g[:, :5], rtol=0, atol=1e-6)  # earlier positions do not see token 5
    assert not torch.allclose(f[:, 5:], g[:, 5:])
    with torch.no_grad():  # eval (fused fast path) and training mode agree: no dropout
        torch.testing.assert_close(model(x), model.train()(x), rtol=1e-5, atol=1e-5)


def test_naive_diag_equals_dense_jacobian_and_the_library():
    model, X, Y = _tiny()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    diag = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    for n in range(len(X)):
        jac = jacrev(lambda p, n=n: functional_call(model, p, (X[n : n + 1],))[0])(params)  # (T, V, *shape)
        J = torch.cat([jac[k].reshape(4, 5, -1) for k in names], -1)  # (T, V, P)
        pi = model(X[n : n + 1])[0].softmax(-1).detach()
        for t in range(4):
            if Y[n, t] != lm.IGNORE:
                lam = torch.diag(pi[t]) - torch.outer(pi[t], pi[t])
                diag += torch.einsum("cp,cd,dp->p", J[t], lam, J[t])
    diag /= len(X)
    naive = lm.naive_true_diag(model, X, Y)
    torch.testing.assert_close(torch.cat([naive[k].flatten() for k in names]), diag, rtol=1e-10, atol=1e-14)
    lib = fl.fisher_diag(model, (X, Y), fl.Categorical())
    torch.testing.assert_close(lib, diag, rtol=1e-10, atol=1e-14)


def test_layer_groups_and_monitored_params():
    torch.manual_seed(0)
    model = lm.CharTransformer(7, 4, d_model=4, heads=2, layers=2, d_ff=6)
    names = [n for n, _ in model.named_parameters()]
    groups = {lm.layer_group(n) for n in names}
    assert groups == {"token embedding", "positions", "block 1 attention", "block 1 MLP", "block 1 norms",
                      "block 2 attention", "block 2 MLP", "block 2 norms", "final norm", "head"}
    assert lm.monitored_params(model) == [n for n in names if "attention" not in lm.layer_group(n)]


def test_batch_monitors_match_the_library():
    """The study's two per-step monitors on one model (the empirical one exact, equal to fl.fisher_trace of the
    batch at the parameters of the step's forward pass; the Hutchinson one positive and of the right size)."""
    torch.manual_seed(1)
    model = lm.CharTransformer(11, 6, d_model=8, heads=2, layers=2, d_ff=12)
    X = torch.randint(0, 11, (20, 6))
    Y = torch.randint(0, 11, (20, 6))
    Y[3, 2:] = lm.IGNORE
    hutch, emp, params = lm.batch_monitors(model, (X[:4], Y[:4]), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = X[5 * step : 5 * step + 7], Y[5 * step : 5 * step + 7]
        model.eval()
        want = fl.fisher_trace(model, (x, y), fl.Categorical(), kind="empirical", params=params)
        true = fl.fisher_trace(model, (x, y), fl.Categorical(), params=params)
        model.train()
        f = model(x)
        loss = F.cross_entropy(f.reshape(-1, 11), y.reshape(-1))  # per token, as in the study
        opt.zero_grad()
        loss.backward()
        opt.step()
        r_h, r_e = hutch.step(targets=y), emp.step(loss=loss, outputs=f, targets=y)
        assert math.isclose(r_e["batch_fisher_trace"], want, rel_tol=1e-4)
        assert 0 < r_h["batch_fisher_trace"] < 20 * true
    hutch.close()
    emp.close()


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible"):
        lm.LmFisherConfig.create("lm-fisher", d_model=30, heads=4)
    with pytest.raises(ValueError, match="n_exact"):
        lm.LmFisherConfig.create("lm-fisher", n_exact=9, n_probe=8)
    with pytest.raises(ValueError, match="data"):
        lm.LmFisherConfig.create("lm-fisher", data="digits")
    with pytest.raises(ValueError, match="modules"):
        lm.LmFisherConfig.create("lm-fisher", modules=("json", "json"))
    cfg = lm.LmFisherConfig.create("lm-fisher", quick=True, modules="json")
    assert cfg.modules == ("json",) and cfg.seq_len == 16


def test_registered():
    assert STUDIES["lm-fisher"] is lm.LmFisher and EXPERIMENTS["lm-fisher"][1] is lm.lm_fisher


# ----------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lm"
    assert main(["run", "lm-fisher", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.study
def test_quick_run_writes_its_folder(quick_run):
    for name in ["config.json", "metrics.csv", "steps.csv", "layers.csv", "hutchinson.csv", "eigenvalues.csv",
                 "results.json", "summary.md", *FIGURES]:
        assert (quick_run / name).is_file(), name
    for name in FIGURES:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((quick_run / "config.json").read_text())
    assert cfg["experiment"] == "lm-fisher" and cfg["quick"] is True and cfg["seq_len"] == 16
    assert cfg["python"] == ".".join(map(str, sys.version_info[:2]))
    summary = (quick_run / "summary.md").read_text()
    assert "**CHECK**" not in summary and "## Consistency checks" in summary and f"Python {sys.version.split()[0]}" \
        in summary
    for name in FIGURES:
        assert f"![{name}]({name})" in summary


@pytest.mark.study
def test_quick_run_checks_hold(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    c = r["checks"]
    # per-token vs per-sequence normalisation: the ratio is the mean number of kept tokens per sequence
    assert c["ratio"] < lm.CHECK_TOL and c["ratio_trace"] < lm.CHECK_TOL and c["ratio_hutchinson"] < lm.CHECK_TOL
    assert math.isclose(r["pair_diag_sum"] / r["pair_diag_per_token_sum"], r["pair_kept"], rel_tol=1e-5)
    assert math.isclose(r["diag_hutchinson_sum"] / r["hutchinson_per_token_sum"], r["few_kept"], rel_tol=1e-5)
    assert r["pair_kept"] < 16 and r["few_kept"] < 16  # padded sequences among them: the ratio is not just T
    assert c["ratio_empirical"] < 1e-6 and c["sum_empirical"] < 1e-6
    assert math.isclose(r["emp_mean"] / r["emp_per_prediction"], r["kept"], rel_tol=1e-6)
    assert c["naive"] < lm.CHECK_TOL and c["lambda_max"] == 0
    lam = r["eigenvalues"]
    assert len(lam) == 10 and all(a >= b > 0 for a, b in zip(lam, lam[1:], strict=False)) and lam[0] <= r["trace"]
    layers = _rows(quick_run / "layers.csv")
    assert math.isclose(sum(float(x["trace"]) for x in layers), r["trace"], rel_tol=1e-9)
    assert sum(int(x["numel"]) for x in layers) == r["P"]
    hut = {x["layer"]: x for x in _rows(quick_run / "hutchinson.csv")}
    assert float(hut["all"]["pearson"]) > 0.9 and 0.5 < float(hut["all"]["rms_z"]) < 2
    assert 0.9 < float(hut["all"]["sum_ratio"]) < 1.1


@pytest.mark.study
def test_quick_run_monitor_tables(quick_run):
    rows = _rows(quick_run / "metrics.csv")
    assert [int(x["step"]) for x in rows] == [0, 10, 20, 30]
    assert all(float(x["fisher_trace"]) > 0 and float(x["loss"]) > 0 for x in rows)
    assert float(rows[-1]["test_token_loss"]) < float(rows[0]["test_token_loss"])  # it learned
    assert math.isclose(float(rows[0]["test_token_loss"]), math.log(65), rel_tol=0.1)  # near uniform at first
    steps = _rows(quick_run / "steps.csv")
    assert [int(x["step"]) for x in steps] == list(range(1, 31))
    assert all(float(x["batch_fisher_emp"]) > 0 for x in steps)
    hut = [float(x["batch_fisher_true_hutchinson"]) for x in steps]  # one draw every batch_true_every = 5 steps
    assert all(v > 0 if (i + 1) % 5 == 0 else math.isnan(v) for i, v in enumerate(hut))
    assert all(0 < float(x["token_loss"]) < 5 for x in steps)


@pytest.mark.study
def test_quick_run_refuses_another_configuration(quick_run):
    with pytest.raises(ValueError):
        lm.lm_fisher(quick_run, quick=True, progress=False, steps=31)


@pytest.mark.study
def test_quick_run_is_reproducible(quick_run, tmp_path):
    again = lm.lm_fisher(tmp_path / "again", quick=True, progress=False)
    for name in ("results.json", "metrics.csv", "steps.csv", "layers.csv", "hutchinson.csv", "eigenvalues.csv"):
        assert (again / name).read_bytes() == (quick_run / name).read_bytes(), name
