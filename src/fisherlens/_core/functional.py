"""The functional engine: per-sample rows by ``torch.func`` for any module ``functional_call`` supports."""

from __future__ import annotations

import warnings

import torch
from torch.func import vjp, vmap

from .fields import Fields
from .layerwise.plan import plan_for
from .model import FunctionalModel, differentiable_kernels, model_errors

Tensor = torch.Tensor


def _owners(fm: FunctionalModel, names) -> str:
    """``'rnn' (RNN), 'head' (Linear)``: the modules that hold the parameters ``names``."""
    out: dict[str, str] = {}
    for n in names:
        path = n.rpartition(".")[0]
        out.setdefault(path or "<root>", type(fm.model.get_submodule(path)).__name__)
    return ", ".join(f"'{k}' ({v})" for k, v in out.items())


def functional_rows(fm: FunctionalModel, names: list[str], X, V: Tensor) -> dict[str, Tensor]:
    """Per-sample factor rows ``G_bk = V_bkᵀ J_b`` for parameters ``names``: dict of ``(B, K, *shape)``
    (``X`` a tensor or keyword inputs, ``V (B, M, K)``).

    ``vmap`` over samples of a ``vjp`` that is itself ``vmap``-ed over the K sandwich columns.  Modules that
    ``vmap`` cannot batch over samples (``nn.RNN``/``LSTM``/``GRU``, ``.item()``, data-dependent control flow) get
    one ``vjp`` per sample instead — exact, with a one-time warning that names them and the cost.
    """
    fixed = {n: fm.params[n] for n in fm.names if n not in names}
    free = {n: fm.params[n] for n in names}

    def one(x, v: Tensor) -> dict[str, Tensor]:
        xb = {k: t[None] for k, t in x.items()} if isinstance(x, dict) else x[None]
        _, pull = vjp(lambda q: fm({**fixed, **q}, xb)[0], free)
        return vmap(lambda c: pull(c)[0], in_dims=1)(v)

    plan = plan_for(fm)
    if not plan.loop:
        try:
            with differentiable_kernels():
                return vmap(one)(X.tree() if isinstance(X, Fields) else X, V)
        except RuntimeError as e:
            plan.loop = True
            warnings.warn(
                f"torch.func.vmap cannot batch this model over samples ({str(e).splitlines()[0][:160]}). "
                f"fisherlens computes the per-sample rows of {_owners(fm, names)} with one vjp per sample instead: "
                "exact, but about batch-size times slower than the batched engines.",
                stacklevel=4,
            )
    with model_errors(X):
        per = [one(X[b].tree() if isinstance(X, Fields) else X[b], V[b]) for b in range(len(X))]
    return {n: torch.stack([r[n] for r in per]) for n in names}
