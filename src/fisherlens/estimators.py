"""Random estimators of the Fisher: Hutchinson "detach-and-mix" (seed 004) and Monte-Carlo labels.

Both draw, per input and per draw s, a random output-space vector ``ξ_n`` with ``E[ξ_n] = 0`` and
``E[ξ_n ξ_nᵀ] = Λ(f_n)`` from the **detached** outputs:

* ``method="hutchinson"``: ``ξ_n = S_n ε_n`` with ``ε_n`` Rademacher (default) or Gaussian (``probe=``);
* ``method="mc"``: ``ξ_n = ∂ℓ(f_n, ŷ_n)/∂f`` with a label ``ŷ_n ~ p(y | f_n)`` (the MC Fisher).

**Batch estimator** (``per_sample=False``, default): back-propagate the scalar ``Σ_n ξ_n · f_θ(x_n)`` once,
``v = Σ_n J_nᵀ ξ_n``.  The ξ_n are independent with mean zero, so ``E[v vᵀ] = Σ_n J_nᵀ Λ_n J_n`` and
``v ⊙ v``, ``‖v‖²``, ``v vᵀ`` summed over batches and divided by N are unbiased for diag F, tr F and F —
**one backward pass per batch and draw** (draws share the forward pass: ``vmap`` over the ``vjp``).
For one diagonal entry ``v_p = Σ a_i ε_i`` and Rademacher ε, ``Var v_p² = 2(Σa²)² − 2Σa⁴``: the
coefficient of variation of one draw is ≤ √2 (exactly √2 for Gaussian ε).  Sampled labels have no such
bound: their CV grows without limit on peaked classifiers.

**Per-sample estimator** (``per_sample=True``): ``(1/N) Σ_n (J_nᵀ ξ_n)²`` drops the cross-sample terms
``n ≠ m`` (lower variance) at the cost of per-sample squared norms (cheap on the layerwise engine).

Every estimate is an :class:`Estimate` ``(value, stderr, samples)``; ``stderr`` is the standard deviation
over the draws divided by √samples (``nan`` for one draw).
"""

from __future__ import annotations

import math
import operator

import torch
from torch.func import vmap

from ._core import Run, check_choice, sandwich, vjp_checked

Tensor = torch.Tensor

__all__ = ["Estimate", "draws", "probe_vectors"]

METHODS = ("hutchinson", "mc")
PROBES = ("rademacher", "gaussian")


class Estimate:
    """A random estimate that behaves like its ``value`` (a float or a tensor).

    Attributes:
        value: the mean over ``samples`` independent draws.
        stderr: standard error of ``value`` (sample standard deviation / √samples; ``nan`` if samples = 1).
        samples: number of independent draws.
    """

    __slots__ = ("value", "stderr", "samples")

    def __init__(self, value, stderr, samples: int):
        self.value, self.stderr, self.samples = value, stderr, samples

    @classmethod
    def from_draws(cls, draws: Tensor, scalar: bool = False) -> Estimate:
        """Estimate from per-draw values ``(S, ...)``."""
        S = draws.shape[0]
        mean = draws.mean(0)
        if S > 1:  # two-pass variance: several times faster than Tensor.std on (S, P)
            err = ((draws - mean).square().sum(0) / (S - 1)).sqrt() / math.sqrt(S)
        else:
            err = torch.full_like(mean, math.nan)
        return cls(float(mean), float(err), S) if scalar else cls(mean, err, S)

    def __float__(self):
        return float(self.value)

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        v = self.value.detach().cpu().numpy() if isinstance(self.value, Tensor) else np.asarray(self.value)
        return v.astype(dtype) if dtype is not None else v

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            if isinstance(a, Estimate):
                return torch.as_tensor(a.value)
            if isinstance(a, (list, tuple)):
                return type(a)(unwrap(x) for x in a)
            return a

        return func(*unwrap(args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name):  # shape, dtype, numel, sum, ... of the value
        return getattr(self.value, name)

    def __getitem__(self, i):
        return self.value[i]

    def __len__(self):
        return len(self.value)

    def __iter__(self):
        return iter(self.value)

    def __repr__(self):
        if isinstance(self.value, Tensor):
            return f"Estimate(value=tensor{tuple(self.value.shape)}, samples={self.samples})"
        return f"Estimate(value={self.value:.6g}, stderr={self.stderr:.3g}, samples={self.samples})"

    def __format__(self, spec):
        return format(self.value, spec)


def _binary(op, reflected=False):
    def f(self, other):
        other = other.value if isinstance(other, Estimate) else other
        return op(other, self.value) if reflected else op(self.value, other)

    return f


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("pow", operator.pow)]:
    setattr(Estimate, f"__{_name}__", _binary(_op))
    setattr(Estimate, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(Estimate, f"__{_name}__", _binary(_op))
Estimate.__neg__ = lambda self: -self.value
Estimate.__abs__ = lambda self: abs(self.value)
Estimate.__hash__ = None


def probe_vectors(run: Run, f: Tensor, method: str, probe: str, draws: int, generator) -> Tensor:
    """Random output-space vectors ``ξ (B, C, draws)`` with ``E ξ = 0``, ``E ξ ξᵀ = Λ(f)`` per input."""
    f = f.detach()
    run.lik.check_outputs(f)
    if method == "mc":
        return sandwich(run.lik, "mc", f, None, draws, generator) * math.sqrt(draws)
    S = run.lik.sqrt_fisher(f)  # (B, C, C)
    shape = (f.shape[0], S.shape[-1], draws)
    if probe == "rademacher":
        eps = torch.randint(0, 2, shape, generator=generator, device=f.device).to(f.dtype) * 2 - 1
    else:
        eps = torch.randn(shape, generator=generator, dtype=f.dtype, device=f.device)
    return S @ eps


def draws(run: Run, method: str, what: str, *, probe: str = "rademacher", per_sample: bool = False,
          samples: int = 1) -> dict[str, Tensor]:
    """Per-draw estimates ``{name: (samples, ...)}`` of each parameter's diag, trace or dense block.

    ``run.kind`` must be ``"true"`` (the estimators target the true Fisher); normalised like ``run``.
    """
    check_choice("method", method, METHODS)
    check_choice("probe", probe, PROBES)
    if run.kind != "true":
        raise ValueError(
            f"method={method!r} estimates the true Fisher; use kind='true' (kind={run.kind!r} is computed exactly "
            "with method='exact')."
        )
    if per_sample and what == "dense":
        raise ValueError("per_sample=True is available for diag and trace; dense blocks use the batch estimator.")
    fm, gen = run.fm, run.generator
    acc: dict[str, Tensor] = {}

    def add(n, x):
        acc[n] = acc[n] + x if n in acc else x

    if per_sample:
        want = {"diagk"} if what == "diag" else {"sqnorm"}
        make_v = lambda f, _: probe_vectors(run, f, method, probe, samples, gen)  # noqa: E731
        for _, _, st in run.chunks(want, make_v, columns=lambda C: samples):
            for n in fm.names:
                add(n, st.diagk[n] if what == "diag" else st.sqnorm[n].sum(0))
    else:
        for X, _ in run.batches():
            f, pull = vjp_checked(fm, X)
            xi = probe_vectors(run, f, method, probe, samples, gen)  # (B, C, S)
            if samples == 1:  # one plain backward pass (vmap over a single draw would only add overhead)
                v = {n: t[None] for n, t in pull(xi[..., 0])[0].items()}
            else:  # {name: (S, *shape)} = Σ_n J_nᵀ ξ_n per draw, draws batched
                v = vmap(lambda c, pull=pull: pull(c)[0], in_dims=2)(xi)
            for n in fm.names:
                vn = v[n].reshape(samples, -1)
                if what == "diag":
                    add(n, vn.square().reshape(samples, *fm.shapes[n]))
                elif what == "trace":
                    add(n, vn.square().sum(-1))
                else:
                    add(n, vn[:, :, None] * vn[:, None, :])
    s = run.scale()
    return {n: a * s for n, a in acc.items()}
