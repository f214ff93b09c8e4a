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
