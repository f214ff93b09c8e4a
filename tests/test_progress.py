"""``progress=``: long library calls (many Hutchinson draws, Lanczos, SLQ) show a tqdm bar on request, and the
numbers do not depend on it."""

from __future__ import annotations

import pytest
import torch
from zoo import make_case

import fisherlens as fl


@pytest.fixture
def case():
    c = make_case("mlp", n=12, batch_size=4)
    return c.model, (c.X, c.Y), c.lik


def _gen():
    return torch.Generator().manual_seed(0)


CALLS = {
    "hutchinson draws": lambda m, d, lik, **kw: fl.fisher_diag(m, d, lik, method="hutchinson", samples=6,
                                                               generator=_gen(), **kw).value,
    "mc draws": lambda m, d, lik, **kw: torch.as_tensor(
        fl.fisher_trace(m, d, lik, method="mc", samples=3, generator=_gen(), **kw).value),
    "blocks": lambda m, d, lik, **kw: torch.tensor([e.value for e in fl.fisher_blocks(
        m, d, lik, what="trace", method="hutchinson", samples=4, generator=_gen(), **kw).values()]),
    "Lanczos": lambda m, d, lik, **kw: fl.eigenvalues(m, d, lik, k=2, method="lanczos", **kw),
    "SLQ": lambda m, d, lik, **kw: fl.spectral_density(m, d, lik, probes=2, steps=5, generator=_gen(), **kw).nodes,
}
SHOWN = {"hutchinson draws": "hutchinson draws", "mc draws": "mc draws", "blocks": "hutchinson draws",
         "Lanczos": "Lanczos, top 2", "SLQ": "SLQ, 2 probes × 5 steps"}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_progress_bar_on_request_only(name, case, capsys):
    model, data, lik = case
    quiet = CALLS[name](model, data, lik)
    assert "fisherlens:" not in capsys.readouterr().err
    shown = CALLS[name](model, data, lik, progress=True)
    err = capsys.readouterr().err
    assert f"fisherlens: {SHOWN[name]}" in err
    assert torch.equal(quiet, shown)


def test_progress_must_be_a_bool(case):
    model, data, lik = case
    with pytest.raises(TypeError, match="progress must be True or False"):
        fl.fisher_trace(model, data, lik, method="hutchinson", samples=2, progress="yes")
