"""Result types shared by the views: estimates, the Fisher–NTK relation, spectra and densities.

* :class:`Estimate` — a random estimate (value, standard error, draws) that behaves like its value;
* :class:`TraceRelation` — both sides of the Fisher–NTK trace relation, a float equal to ``tr F``;
* :class:`Eigen` — eigenvalues with parameter-space eigenvectors (the Gram / dual route);
* :class:`SpectralDensity` — a stochastic Lanczos quadrature density;
* :class:`Curvature` — scalar curvature (and optionally Ricci, Christoffel, Riemann) of a metric at many points.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

__all__ = ["Estimate", "TraceRelation", "Eigen", "SpectralDensity", "Curvature", "split_flat"]


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


class TraceRelation(float):
    """The Fisher–NTK trace relation (Sauter 2023, eq 5.1.2): a float equal to ``tr F``, with both sides.

    Attributes (all means over the N inputs):
        fisher_trace: ``tr F`` computed directly, ``(1/N) Σ_n ‖V_nᵀ J_n‖²`` (empirical: ``(1/N) Σ ‖g_n‖²``).
        ntk_side: the right-hand side ``(1/N) Σ_n tr(V_nᵀ Θ_nn V_n)`` — ``(1/N) Σ r_nᵀ Θ_nn r_n`` for the
            empirical Fisher, ``(1/N) Σ tr(Λ_n Θ_nn)`` for the true Fisher; equal to ``fisher_trace``.
        ntk_trace: ``(1/N) Σ_n tr Θ_nn``, the NTK alone.
        ratio: ``fisher_trace / ntk_trace``; constant over training when the NTK alone explains tr F.
        per_sample: optional ``(fisher (N,), ntk (N,))`` per-input traces (``per_sample=True``).
    """

    fisher_trace: float
    ntk_side: float
    ntk_trace: float
    per_sample: tuple[Tensor, Tensor] | None

    def __new__(cls, fisher_trace, ntk_side, ntk_trace, per_sample=None):
        obj = super().__new__(cls, fisher_trace)
        obj.fisher_trace, obj.ntk_side, obj.ntk_trace = fisher_trace, ntk_side, ntk_trace
        obj.per_sample = per_sample
        return obj

    @property
    def ratio(self) -> float:
        return self.fisher_trace / self.ntk_trace if self.ntk_trace else math.nan

    def __repr__(self):
        return (
            f"TraceRelation(fisher_trace={self.fisher_trace:.6g}, ntk_side={self.ntk_side:.6g}, "
            f"ntk_trace={self.ntk_trace:.6g}, ratio={self.ratio:.6g})"
        )


def split_flat(v: Tensor, names, shapes) -> dict[str, Tensor]:
    """Split flat ``v (..., P)`` in ``named_parameters`` order into ``{name: (..., *shape)}``."""
    out, i = {}, 0
    for n in names:
        k = shapes[n].numel()
        out[n] = v[..., i : i + k].reshape(*v.shape[:-1], *shapes[n])
        i += k
    return out


@dataclass
class Eigen:
    """Nonzero spectrum of a Fisher from its Gram matrix, with eigenvectors in parameter space.

    Attributes:
        values: all Gram eigenvalues, descending ``(R,)`` (``R = N·K``; every nonzero Fisher eigenvalue is among
            them, the remaining ``P − R`` are zero).  Round-off negatives are clamped to 0.
        vectors: unit Fisher eigenvectors as columns ``(P, R)``; a column is zero where its eigenvalue is
            numerically zero (``λ ≤ R·eps·λ_max``), since there ``Gᵀw/√λ`` is not defined.
        rank: number of numerically nonzero eigenvalues.
    Batched per-input results carry a leading ``N`` on ``values``, ``vectors`` and ``rank``.
    """

    values: Tensor
    vectors: Tensor
    rank: Tensor | int
    names: list[str]
    shapes: dict[str, torch.Size]

    def unflatten(self) -> dict[str, Tensor]:
        """Eigenvectors per parameter: ``{name: (..., R, *shape)}`` (eigenvector index before the parameter's
        shape, e.g. ``(R, 25, 784)`` for the first layer of a 784-25-10 network)."""
        v = self.vectors.transpose(-1, -2)
        return split_flat(v, self.names, self.shapes)


@dataclass
class SpectralDensity:
    """Result of :func:`spectral_density`.

    Attributes:
        grid: eigenvalue grid ``(G,)`` (log-spaced when ``log``).
        density: density on the grid ``(G,)``: per unit λ, or per unit log10 λ when ``log``; it integrates to
            ``1 − zero_mass`` over the grid's variable.
        nodes, weights: quadrature nodes (Ritz values) and weights ``(probes, m)``; weights sum to 1 per probe.
        zero_mass: weight of nodes ≤ ``floor`` (the null space; only for ``log``).
        dim: P, so that ``dim · Σ w θ^p / probes`` estimates ``tr F^p``.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    zero_mass: float
    log: bool
    dim: int

    def moment(self, p: int) -> float:
        """Estimate of ``tr(F^p) / P`` from the quadrature (exact in expectation for p < 2m)."""
        return float((self.weights * self.nodes**p).sum(1).mean())


@dataclass
class Curvature:
    """Geometry at ``M`` points, from :func:`curvature`.

    Attributes:
        theta: ``(M, d)`` the points.
        metric: ``(M, d, d)`` the metric ``g`` as returned by the metric callable (not regularised).
        scalar: ``(M,)`` scalar curvature ``R`` (NaN exactly where ``singular``).
        cond: ``(M,)`` condition number ``max|λ|/min|λ|`` of ``g`` (inf: singular or non-finite).
        singular: ``(M,)`` bool, no value could be computed (see ``reason``).
        regularized: ``(M,)`` bool, the value is that of ``g + eps·I`` (``regularize=eps``).
        reason: per point, ``""`` where fine, else why it is singular or regularised.
        ricci: ``(M, d, d)`` if requested (``keep``), else ``None``; likewise ``christoffel (M, d, d, d)``
            and ``riemann (M, d, d, d, d)``.
    """

    theta: Tensor
    metric: Tensor
    scalar: Tensor
    cond: Tensor
    singular: Tensor
    regularized: Tensor
    reason: list[str] = field(default_factory=list)
    ricci: Tensor | None = None
    christoffel: Tensor | None = None
    riemann: Tensor | None = None
