"""Slow, obvious reference implementations for the fisherlens tests.

Everything here is built from explicit Python loops over samples and outputs with
``torch.autograd.grad``; nothing from ``fisherlens`` is imported or called, so a test comparing a
library result with these references compares two independent computations.

Output models and losses are described by plain *specs* (tuples), not by library objects:

* ``("gaussian", sigma)``, ``("categorical",)``, ``("bernoulli",)`` — negative log-likelihoods;
* ``("lp", p)``, ``("mean_power", n)``, ``("sce",)`` — the seed losses (targets one-hot encoded when
  they are integer class labels);
* ``("custom", fn)`` — a user callable ``fn(f (B, C), y) -> (B,)`` defined in the tests.

Also here: the output-space square roots ``S`` (``S Sᵀ = Λ``) and the factor rows ``Ĵ`` of the true Fisher
(SCIENCE §2, §6), and Brioschi's formula for the curvature of a 2-D metric from finite differences.

Conventions (SCIENCE.md): θ is the concatenation of the selected parameters, flattened, in
``named_parameters()`` order; ``J_n = ∂f(x_n)/∂θ`` is ``(C, P)``; every Fisher is a mean over the
N inputs; the NTK is summed over parameters and not averaged over outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- parameters
def named_params(model, names=None) -> list[tuple[str, Tensor]]:
    """Selected parameters in ``named_parameters()`` order (default: all with requires_grad)."""
    out = [(n, p) for n, p in model.named_parameters() if p.requires_grad or names is not None]
    if names is not None:
        out = [(n, p) for n, p in out if n in set(names)]
    return out


def slices(model, names=None) -> dict[str, slice]:
    """Where each selected parameter lives in the flat θ."""
    out, i = {}, 0
    for n, p in named_params(model, names):
        out[n] = slice(i, i + p.numel())
        i += p.numel()
    return out


def flat_params(model, names=None) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in named_params(model, names)])


def flat_grad(scalar: Tensor, params: list[Tensor]) -> Tensor:
    """∇ of a scalar w.r.t. ``params``, flattened and concatenated (zeros for unused ones)."""
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
         for g, p in zip(grads, params, strict=True)]
    )


# ----------------------------------------------------------------------------- model pieces
def forward_one(model, x: Tensor) -> Tensor:
    """Outputs ``(C,)`` of the model on the single input ``x`` (a batch of one)."""
    return model(x.unsqueeze(0)).reshape(-1)


def outputs(model, X: Tensor) -> Tensor:
    """Outputs ``(N, C)``, one input at a time."""
    with torch.no_grad():
        return torch.stack([forward_one(model, X[n]) for n in range(len(X))])


def jacobians(model, X: Tensor, names=None) -> Tensor:
    """Per-sample Jacobians ``(N, C, P)``: one ``autograd.grad`` per sample and output."""
    params = [p for _, p in named_params(model, names)]
    rows = []
    for n in range(len(X)):
        f = forward_one(model, X[n])
        rows.append(torch.stack([flat_grad(f[a], params) for a in range(f.numel())]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- output models
def log_softmax(f: Tensor) -> Tensor:
    return f - torch.logsumexp(f, dim=-1, keepdim=True)


def output_fisher(spec, f: Tensor) -> Tensor:
    """Λ(f) ``(C, C)`` for one output vector ``f (C,)``, written out from SCIENCE §2."""
    name = spec[0]
    C = f.numel()
    if name == "gaussian":
        return torch.eye(C, dtype=f.dtype) / spec[1] ** 2
    if name == "categorical":
        p = torch.exp(log_softmax(f))
        return torch.diag(p) - torch.outer(p, p)
    if name == "bernoulli":
        p = 1.0 / (1.0 + torch.exp(-f))
        return (p * (1 - p)).reshape(1, 1)
    raise ValueError(f"no output Fisher for {spec}")


def _target_vector(y: Tensor, C: int, dtype) -> Tensor:
    if torch.is_floating_point(y):
        return y.reshape(-1).to(dtype)
    t = torch.zeros(C, dtype=dtype)
    t[int(y)] = 1.0
    return t


def nll(spec, f: Tensor, y: Tensor) -> Tensor:
    """Per-sample loss for one output vector ``f (C,)`` and one target ``y``."""
    name = spec[0]
    C = f.numel()
    if name == "gaussian":
        return 0.5 * ((f - y.reshape(-1).to(f.dtype)) ** 2).sum() / spec[1] ** 2
    if name == "categorical":
        if torch.is_floating_point(y) and y.numel() == C and C > 1:
            return -(y * log_softmax(f)).sum()
        return -log_softmax(f)[int(y)]
    if name == "bernoulli":
        t = y.reshape(-1).to(f.dtype)
        return (t * F.softplus(-f) + (1 - t) * F.softplus(f)).sum()
    if name == "lp":
        return (torch.abs(f - _target_vector(y, C, f.dtype)) ** spec[1]).sum() ** (1.0 / spec[1])
    if name == "mean_power":
        return ((f - _target_vector(y, C, f.dtype)) ** spec[1]).sum() / C
    if name == "sce":
        return -(_target_vector(y, C, f.dtype) * log_softmax(f)).sum()
    if name == "custom":
        return spec[1](f[None], y[None])[0]
    raise ValueError(f"unknown spec {spec}")


def residual(spec, f: Tensor, y: Tensor) -> Tensor:
    """``r = ∂ℓ/∂f`` ``(C,)`` for one sample."""
    f = f.detach().clone().requires_grad_(True)
    (r,) = torch.autograd.grad(nll(spec, f, y), f)
    return r


def kl(spec, f: Tensor, g: Tensor) -> Tensor:
    """KL(p(·|f) ‖ p(·|g)) for one sample, from the textbook formulas."""
    name = spec[0]
    if name == "gaussian":
        return 0.5 * ((f - g) ** 2).sum() / spec[1] ** 2
    if name == "categorical":
        lf, lg = log_softmax(f), log_softmax(g)
        return (torch.exp(lf) * (lf - lg)).sum()
    if name == "bernoulli":
        pf, pg = torch.sigmoid(f), torch.sigmoid(g)
        return (pf * torch.log(pf / pg) + (1 - pf) * torch.log((1 - pf) / (1 - pg))).sum()
    raise ValueError(f"no KL for {spec}")


# ----------------------------------------------------------------------------- Fisher matrices
def per_sample_grads(model, X: Tensor, Y, spec, names=None) -> Tensor:
    """``g_n = ∇_θ ℓ(f(x_n), y_n)`` ``(N, P)``, one backward pass per sample."""
    params = [p for _, p in named_params(model, names)]
    return torch.stack(
        [flat_grad(nll(spec, forward_one(model, X[n]), Y[n]), params) for n in range(len(X))]
    )


def true_fisher(model, X: Tensor, spec, names=None) -> Tensor:
    """``(1/N) Σ_n J_nᵀ Λ(f_n) J_n``."""
    J = jacobians(model, X, names)
    f = outputs(model, X)
    P = J.shape[-1]
    out = torch.zeros(P, P, dtype=J.dtype)
    for n in range(len(X)):
        out += J[n].T @ output_fisher(spec, f[n]) @ J[n]
    return out / len(X)


def empirical_fisher(model, X: Tensor, Y, spec, names=None) -> Tensor:
    """``(1/N) Σ_n g_n g_nᵀ``."""
    G = per_sample_grads(model, X, Y, spec, names)
    out = torch.zeros(G.shape[1], G.shape[1], dtype=G.dtype)
    for n in range(len(G)):
        out += torch.outer(G[n], G[n])
    return out / len(G)


def mc_fisher(model, X: Tensor, labels: Tensor, spec, names=None) -> Tensor:
    """``(1/(N k)) Σ_n Σ_j g_nj g_njᵀ`` with ``labels (k, N, ...)`` drawn beforehand."""
    k = labels.shape[0]
    out = 0.0
    for j in range(k):
        out = out + empirical_fisher(model, X, labels[j], spec, names)
    return out / k


def fisher(model, X, Y, spec, kind, names=None, labels=None) -> Tensor:
    if kind == "true":
        return true_fisher(model, X, spec, names)
    if kind == "empirical":
        return empirical_fisher(model, X, Y, spec, names)
    if kind == "mc":
        return mc_fisher(model, X, labels, spec, names)
    raise ValueError(kind)


def sqrt_output_fisher(spec, f: Tensor) -> Tensor:
    """``S (N, C, C)`` with ``S_n S_nᵀ = Λ(f_n)`` for outputs ``f (N, C)``, written out by hand (SCIENCE §2)."""
    N, C = f.shape
    name = spec[0]
    if name == "gaussian":
        return torch.eye(C, dtype=f.dtype).expand(N, C, C) / spec[1]
    if name == "bernoulli":
        p = 1 / (1 + torch.exp(-f))
        return (p * (1 - p)).sqrt().reshape(N, 1, 1)
    if name != "categorical":
        raise ValueError(f"no output Fisher for {spec}")
    p = torch.exp(f - torch.logsumexp(f, -1, keepdim=True))
    out = []
    for n in range(N):
        sp = p[n].sqrt()
        out.append(torch.diag(sp) - torch.outer(p[n], sp))
    return torch.stack(out)


def factor_rows(model, X: Tensor, spec, names=None) -> Tensor:
    """``Ĵ (N·C, P)`` with rows ``(S_nᵀ J_n)``: ``F = Ĵᵀ Ĵ / N``, and column p of Ĵ is the ``a`` of SCIENCE §6."""
    J = jacobians(model, X, names)
    S = sqrt_output_fisher(spec, outputs(model, X))
    return torch.einsum("nck,ncp->nkp", S, J).reshape(-1, J.shape[-1])


def blocks(F_: Tensor, model, names=None) -> dict[str, Tensor]:
    """Diagonal blocks ``F[name, name]`` of a dense Fisher."""
    return {n: F_[s, s] for n, s in slices(model, names).items()}


def block_diags(F_: Tensor, model, names=None) -> dict[str, Tensor]:
    shapes = {n: p.shape for n, p in named_params(model, names)}
    return {n: torch.diagonal(F_)[s].reshape(shapes[n]) for n, s in slices(model, names).items()}


def block_traces(F_: Tensor, model, names=None) -> dict[str, float]:
    return {n: float(torch.trace(F_[s, s])) for n, s in slices(model, names).items()}


# ----------------------------------------------------------------------------- NTK
def ntk(model, X1: Tensor, X2: Tensor | None = None, names=None) -> Tensor:
    """``Θ[n, m, a, b] = ∇f_a(x1_n) · ∇f_b(x2_m)`` ``(N1, N2, C, C)``, by explicit loops."""
    J1 = jacobians(model, X1, names)
    J2 = J1 if X2 is None else jacobians(model, X2, names)
    N1, C, _ = J1.shape
    N2 = J2.shape[0]
    out = torch.zeros(N1, N2, C, C, dtype=J1.dtype)
    for n in range(N1):
        for m in range(N2):
            for a in range(C):
                for b in range(C):
                    out[n, m, a, b] = torch.dot(J1[n, a], J2[m, b])
    return out


def ntk_trace(model, X: Tensor, names=None) -> float:
    """``Σ_n Σ_a ‖∇f_a(x_n)‖²``."""
    J = jacobians(model, X, names)
    return float(sum((J[n, a] ** 2).sum() for n in range(J.shape[0]) for a in range(J.shape[1])))


def relation_ntk_side(model, X, Y, spec, kind, labels=None) -> float:
    """Right-hand side of the Fisher–NTK relation, ``(1/N) Σ_n tr(V_nᵀ Θ_nn V_n)``.

    empirical: ``r_nᵀ Θ_nn r_n``; true: ``tr(Λ_n Θ_nn)``; mc: the mean over the drawn labels.
    """
    theta = ntk(model, X)
    f = outputs(model, X)
    total = 0.0
    for n in range(len(X)):
        t = theta[n, n]
        if kind == "true":
            total += float(torch.trace(output_fisher(spec, f[n]) @ t))
        elif kind == "empirical":
            r = residual(spec, f[n], Y[n])
            total += float(r @ t @ r)
        else:
            for j in range(labels.shape[0]):
                r = residual(spec, f[n], labels[j, n])
                total += float(r @ t @ r) / labels.shape[0]
    return total / len(X)


# ----------------------------------------------------------------------------- curvature of a 2-D metric
def brioschi(metric, q, h: float = 2e-3) -> float:
    """2K by Brioschi's formula from central differences of E = g11, F = g12, G = g22 (Richardson-extrapolated
    over h and h/2; independent of the Christoffel route).  ``metric(q (2,)) -> (2, 2)`` float64."""

    def step(i, j):
        return torch.tensor((i, j), dtype=torch.float64)

    def once(h):
        qq = torch.as_tensor(q, dtype=torch.float64)
        S = {(i, j): metric(qq + h * step(i, j)).numpy() for i in (-1, 0, 1) for j in (-1, 0, 1)}
        g0 = S[0, 0]
        du, dv = (S[1, 0] - S[-1, 0]) / (2 * h), (S[0, 1] - S[0, -1]) / (2 * h)
        duu, dvv = (S[1, 0] - 2 * g0 + S[-1, 0]) / h**2, (S[0, 1] - 2 * g0 + S[0, -1]) / h**2
        duv = (S[1, 1] - S[1, -1] - S[-1, 1] + S[-1, -1]) / (4 * h * h)
        E, F, Gg = g0[0, 0], g0[0, 1], g0[1, 1]
        A = np.array([[-dvv[0, 0] / 2 + duv[0, 1] - duu[1, 1] / 2, du[0, 0] / 2, du[0, 1] - dv[0, 0] / 2],
                      [dv[0, 1] - du[1, 1] / 2, E, F], [dv[1, 1] / 2, F, Gg]])
        B = np.array([[0, dv[0, 0] / 2, du[1, 1] / 2], [dv[0, 0] / 2, E, F], [du[1, 1] / 2, F, Gg]])
        return 2 * (np.linalg.det(A) - np.linalg.det(B)) / (E * Gg - F * F) ** 2

    return (4 * once(h / 2) - once(h)) / 3


# ----------------------------------------------------------------------------- structured (sequence) outputs
# A model's output on one input has shape S = (*positions, C) (channels="last") or (C, *positions)
# (channels="first"); ("bernoulli",) treats every logit as its own prediction (C = 1, positions = all of S).
# Labels are class ids shaped like the positions (predictions equal to ``ignore_index`` are dropped) or float
# tensors shaped like the outputs; an optional bool ``mask`` shaped like the positions (True = keep) drops more.
# The per-input Fisher is the sum over its kept positions of the per-position Fisher; normalisations:
# "mean" (1/N, N the number of inputs), "per_prediction" (1/number of kept positions in the batch) or "sum".
# Inputs ``X`` are a tensor (N, ...) or a dict of such tensors (passed to the model as keyword arguments).


def spec_name(spec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def _as_spec(spec) -> tuple:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def n_inputs(X) -> int:
    return len(next(iter(X.values()))) if isinstance(X, dict) else len(X)


def input_item(X, n: int):
    """Input ``n`` of ``X`` as a batch of one (a tensor ``X[n:n+1]`` or a dict of such slices)."""
    if isinstance(X, dict):
        return {k: v[n : n + 1] for k, v in X.items()}
    return X[n : n + 1]


def seq_forward_one(model, x1, forward=None) -> Tensor:
    """The output ``(*S)`` of one input given as a batch of one: ``forward(model, x1)``, by default ``model(x1)``
    (``model(**x1)`` for a dict); the leading batch axis of size one is dropped."""
    if forward is not None:
        out = forward(model, x1)
    else:
        out = model(**x1) if isinstance(x1, dict) else model(x1)
    assert isinstance(out, Tensor) and out.shape[0] == 1, "forward must give a tensor (1, *S)"
    return out[0]


def row_index(S: tuple[int, ...], spec, channels: str = "last") -> Tensor:
    """``idx (R, C)``: entry ``[r, c]`` is the position of prediction r's channel c in the flattened output
    (the model's own flatten order); rows in row-major order of the positions."""
    idx = torch.arange(int(np.prod(S))).reshape(S)
    if spec_name(spec) == "bernoulli":
        return idx.reshape(-1, 1)
    if channels == "first":
        idx = idx.movedim(0, -1)
    elif channels != "last":
        raise ValueError(channels)
    return idx.reshape(-1, idx.shape[-1])


def label_rows(y: Tensor, idx: Tensor) -> Tensor:
    """The labels of one input per row: class ids ``(R,)`` (any integer tensor shaped like the positions) or float
    targets shaped like the outputs, as ``(R, C)`` in the row layout of ``idx``."""
    if not torch.is_floating_point(y):
        return y.reshape(-1)
    return y.reshape(-1)[idx]


def kept_rows(y: Tensor | None, m: Tensor | None, idx: Tensor, ignore_index: int | None) -> Tensor:
    """Bool ``(R,)``: the rows that count (class ids not equal to ``ignore_index``, and ``mask`` True)."""
    keep = torch.ones(idx.shape[0], dtype=torch.bool)
    if y is not None and not torch.is_floating_point(y) and ignore_index is not None:
        keep &= y.reshape(-1) != ignore_index
    if m is not None:
        keep &= m.reshape(-1).bool()
    return keep


def _norm(reduction: str, N: int, count: int) -> float:
    if reduction == "mean":
        return 1.0 / N
    if reduction == "per_prediction":
        return 1.0 / count
    if reduction == "sum":
        return 1.0
    raise ValueError(reduction)


def _accumulate(acc, A: Tensor, what: str):
    """Add ``Aᵀ A`` (what="dense") or its diagonal (what="diag") of factor rows ``A (K, P)``."""
    return acc + (A.T @ A if what == "dense" else (A * A).sum(0))


def seq_fisher(model, X, Y, kind, spec, channels="last", ignore_index=-100, mask=None, reduction="mean", *,
               labels=None, names=None, forward=None, what="dense") -> Tensor:
    """The Fisher of structured outputs, one input, one position and one class at a time, ``(P, P)`` (or its
    diagonal ``(P,)`` with ``what="diag"``, for models too large for a dense reference).

    * ``kind="true"``: ``Σ_n Σ_{t kept} J_ntᵀ Λ_t J_nt`` with ``J_nt (C, P)`` one ``autograd.grad`` per class and
      ``Λ_t`` the per-position output Fisher (:func:`output_fisher`: ``diag(π) − ππᵀ``, ``I/σ²``, ``π(1−π)``);
    * ``kind="empirical"``: ``Σ_n g_n g_nᵀ`` with ``g_n`` the gradient of input n's loss summed over its kept
      positions (one backward per input);
    * ``kind="mc"``: the empirical Fisher averaged over drawn ``labels (k, N, ...)`` (each shaped like ``Y``).

    ``Y`` may be ``None`` for ``kind="true"`` (then only ``mask`` drops positions); normalised by
    ``reduction`` ("mean" 1/N, "per_prediction" 1/number of kept positions, "sum").
    """
    spec = _as_spec(spec)
    params = [p for _, p in named_params(model, names)]
    P = sum(p.numel() for p in params)
    N = n_inputs(X)
    acc = torch.zeros((P, P) if what == "dense" else (P,), dtype=torch.float64)
    count = 0
    for n in range(N):
        f = seq_forward_one(model, input_item(X, n), forward)
        idx = row_index(tuple(f.shape), spec, channels)
        flat = f.reshape(-1)
        y = None if Y is None else Y[n]
        keep = kept_rows(y, None if mask is None else mask[n], idx, ignore_index)
        count += int(keep.sum())
        rows = [r for r in range(idx.shape[0]) if keep[r]]
        if kind == "true":
            for r in rows:
                J = torch.stack([flat_grad(flat[int(i)], params) for i in idx[r]]).double()  # (C, P)
                Lam = output_fisher(spec, flat[idx[r]].detach().double())
                if what == "dense":
                    acc += J.T @ Lam @ J
                else:
                    acc += ((Lam @ J) * J).sum(0)
            continue
        if kind == "empirical":
            label_sets = [y]
        elif kind == "mc":
            label_sets = [labels[j][n] for j in range(labels.shape[0])]
        else:
            raise ValueError(kind)
        for lab in label_sets:
            yr = label_rows(lab, idx)
            loss = sum(nll(spec, flat[idx[r]], yr[r]) for r in rows) if rows else flat.sum() * 0
            g = flat_grad(loss, params).double()
            acc = _accumulate(acc, g[None] / math.sqrt(len(label_sets)), what)
    return acc * _norm(reduction, N, count)


def seq_position_empirical_fisher(model, X, Y, spec, channels="last", ignore_index=-100, mask=None,
                                  reduction="mean", *, names=None, forward=None) -> Tensor:
    """``Σ_n Σ_{t kept} g_nt g_ntᵀ`` with ``g_nt`` the gradient of the loss of *one position* (every prediction its
    own example, as curvlinops' EF flattens the positions into the batch axis), normalised like :func:`seq_fisher`."""
    spec = _as_spec(spec)
    params = [p for _, p in named_params(model, names)]
    P = sum(p.numel() for p in params)
    N = n_inputs(X)
    acc = torch.zeros(P, P, dtype=torch.float64)
    count = 0
    for n in range(N):
        f = seq_forward_one(model, input_item(X, n), forward)
        idx = row_index(tuple(f.shape), spec, channels)
        flat = f.reshape(-1)
        keep = kept_rows(Y[n], None if mask is None else mask[n], idx, ignore_index)
        yr = label_rows(Y[n], idx)
        for r in range(idx.shape[0]):
            if keep[r]:
                g = flat_grad(nll(spec, flat[idx[r]], yr[r]), params).double()
                acc += torch.outer(g, g)
                count += 1
    return acc * _norm(reduction, N, count)


def seq_count(model, X, Y, spec, channels="last", ignore_index=-100, mask=None, forward=None) -> int:
    """Number of kept predictions (positions) of the batch."""
    total = 0
    with torch.no_grad():
        for n in range(n_inputs(X)):
            f = seq_forward_one(model, input_item(X, n), forward)
            idx = row_index(tuple(f.shape), spec, channels)
            total += int(kept_rows(None if Y is None else Y[n], None if mask is None else mask[n], idx,
                                   ignore_index).sum())
    return total


def seq_input_losses(model, X, Y, spec, channels="last", ignore_index=-100, mask=None, forward=None) -> Tensor:
    """``(N,)``: each input's loss summed over its kept positions (with the graph, for gradients)."""
    spec = _as_spec(spec)
    out = []
    for n in range(n_inputs(X)):
        f = seq_forward_one(model, input_item(X, n), forward)
        idx = row_index(tuple(f.shape), spec, channels)
        flat = f.reshape(-1)
        keep = kept_rows(Y[n], None if mask is None else mask[n], idx, ignore_index)
        yr = label_rows(Y[n], idx)
        out.append(sum((nll(spec, flat[idx[r]], yr[r]) for r in range(idx.shape[0]) if keep[r]), flat.sum() * 0))
    return torch.stack(out)


def seq_jacobians(model, X, names=None, forward=None) -> Tensor:
    """Per-input output Jacobians ``(N, M, P)``, ``M = prod(S)`` in the model's own flatten order: one
    ``autograd.grad`` per input and output entry."""
    params = [p for _, p in named_params(model, names)]
    out = []
    for n in range(n_inputs(X)):
        flat = seq_forward_one(model, input_item(X, n), forward).reshape(-1)
        out.append(torch.stack([flat_grad(flat[a], params) for a in range(flat.numel())]))
    return torch.stack(out).double()


def seq_ntk(model, X1, X2=None, names=None, forward=None) -> Tensor:
    """``Θ (N1, N2, M, M)``, ``Θ[n, m] = J_n J_mᵀ`` from :func:`seq_jacobians`."""
    J1 = seq_jacobians(model, X1, names, forward)
    J2 = J1 if X2 is None else seq_jacobians(model, X2, names, forward)
    out = torch.zeros(J1.shape[0], J2.shape[0], J1.shape[1], J2.shape[1], dtype=torch.float64)
    for n in range(J1.shape[0]):
        for m in range(J2.shape[0]):
            out[n, m] = J1[n] @ J2[m].T
    return out


def seq_envelope(model, X, which="diag", channels="last", mask=None, reduction="mean", *, names=None,
                 forward=None) -> Tensor:
    """The categorical envelopes summed over positions, ``(P, P)``: ``Σ_n Σ_t J_ntᵀ diag(π_nt) J_nt``
    (``which="diag"``) or ``Σ_n Σ_t (1 − ‖π_nt‖²) J_ntᵀ J_nt`` (``"isotropic"``), normalised like the Fisher."""
    J = seq_jacobians(model, X, names, forward)
    P = J.shape[-1]
    acc = torch.zeros(P, P, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for n in range(J.shape[0]):
            f = seq_forward_one(model, input_item(X, n), forward)
            idx = row_index(tuple(f.shape), ("categorical",), channels)
            flat = f.reshape(-1).double()
            keep = kept_rows(None, None if mask is None else mask[n], idx, None)
            for r in range(idx.shape[0]):
                if not keep[r]:
                    continue
                count += 1
                p = torch.softmax(flat[idx[r]], -1)
                Jr = J[n][idx[r]]
                acc += Jr.T @ torch.diag(p) @ Jr if which == "diag" else (1 - (p * p).sum()) * Jr.T @ Jr
    return acc * _norm(reduction, J.shape[0], count)
