r"""Random networks of the mean-field ensemble, as ``nn.Module`` s and as batched ensembles with an exact dual matrix.

The ensemble of Karakida, Akaho & Amari (2019), *Universal Statistics of Fisher Information in Deep Neural Networks:
Mean Field Approach* (docs/references.md; conventions: docs/conventions.md#mean-field-theory).
Parameterisation (their eqs 5 and 8; standard, *not* NTK): ``u^l = W^l h^{l−1} + b^l``, ``h^l = φ(u^l)``,
``f = u^L`` (linear outputs), ``W^l_ij ~ N(0, σ_w²/M_{l−1})``, ``b^l_i ~ N(0, σ_b²)`` — i.e. ``nn.Linear`` layers
with these initial variances.  Inputs are ``x ~ N(0, I_{M_0})`` (not normalised by √M_0).

:class:`MLPEnsemble` holds E such networks as stacked tensors and computes, for inputs ``x_1 … x_T``, the exact
dual (Gram) matrix of the Gaussian-σ=1 FIM of their eq 2 for every member, by one batched forward and
backward pass (no per-sample loop, no Jacobian, never the P × P matrix)::

    F* = (1/T) Ĵ Ĵᵀ  (TC × TC),   F*_{(s,k),(t,k')} = (1/T) Σ_l (h^{l−1}(s)·h^{l−1}(t) + 1) (δ^l_k(s)·δ^l_{k'}(t)),

with ``δ^l_k = ∂f_k/∂u^l`` (eq 7; ``δ^L_k = e_k``).  Its eigenvalues are the nonzero eigenvalues of F
(docs/conventions.md#gram-duality); ``tr F* = tr F`` and ``‖F*‖_F² = tr F²``.  Rows and columns are ordered ``(t, k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor
TorchFn = Callable[[Tensor], Tensor]

__all__ = [
    "TORCH_ACTIVATIONS", "Elementwise", "MLPEnsemble", "standard_normals", "random_mlp", "ensemble_stats",
    "single_thread",
]


def _relu_d(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _tanh_d(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def _erf_d(x: Tensor) -> Tensor:
    return (2 / math.sqrt(math.pi)) * torch.exp(-x * x)


def _sigmoid_d(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


#: name -> (φ, φ') acting on tensors (the names of :data:`fisherlens.theory.meanfield.ACTIVATIONS`).
TORCH_ACTIVATIONS: dict[str, tuple[TorchFn, TorchFn]] = {
    "linear": (lambda x: x, torch.ones_like),
    "relu": (torch.relu, _relu_d),
    "tanh": (torch.tanh, _tanh_d),
    "erf": (torch.special.erf, _erf_d),
    "sigmoid": (torch.sigmoid, _sigmoid_d),
}


def _torch_act(activation: str | tuple[TorchFn, TorchFn]) -> tuple[str, TorchFn, TorchFn]:
    if isinstance(activation, str):
        if activation.lower() not in TORCH_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(TORCH_ACTIVATIONS)}.")
        return (activation.lower(), *TORCH_ACTIVATIONS[activation.lower()])
    if isinstance(activation, tuple) and len(activation) == 2 and all(map(callable, activation)):
        return ("custom", *activation)
    raise TypeError(f"activation must be a name or a pair (phi, dphi) of tensor functions, got {activation!r}.")


class Elementwise(nn.Module):
    """An elementwise activation as a module (e.g. erf, which ``torch.nn`` lacks)."""

    def __init__(self, fn: TorchFn, name: str = "custom"):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _per_layer(v: float | Sequence[float], L: int, name: str = "variance", positive: bool = False) -> list[float]:
    """Per-layer variances: finite, ``> 0`` (``positive``, the weights') or ``≥ 0`` (the biases')."""
    try:
        vals = [float(v)] * L if isinstance(v, (int, float)) else [float(x) for x in v]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number or {L} per-layer numbers, got {v!r}.") from e
    if len(vals) != L:
        raise ValueError(f"{name}: expected a number or {L} per-layer values, got {v!r}.")
    if not all(math.isfinite(x) and (x > 0 if positive else x >= 0) for x in vals):
        raise ValueError(f"{name} must be finite and {'positive' if positive else 'non-negative'}, got {v!r}.")
    return vals


def _positive_integer(m) -> bool:
    try:
        return not isinstance(m, bool) and float(m).is_integer() and int(m) >= 1
    except (TypeError, ValueError, OverflowError):
        return False


def standard_normals(
    E: int, sizes: Sequence[int], generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> tuple[list[Tensor], list[Tensor]]:
    """Standard normal weights ``[(E, M_l, M_{l−1})]`` and biases ``[(E, M_l)]`` for widths ``sizes = [M_0 … M_L]``
    (scaled by :meth:`MLPEnsemble.from_normals`; sharing them across activations gives common random numbers)."""
    Zw = [torch.randn(E, sizes[i + 1], sizes[i], generator=generator, dtype=dtype) for i in range(len(sizes) - 1)]
    Zb = [torch.randn(E, sizes[i + 1], generator=generator, dtype=dtype) for i in range(len(sizes) - 1)]
    return Zw, Zb


@dataclass
class MLPEnsemble:
    """E random MLPs of the mean-field architecture (Karakida et al. 2019) as stacked tensors.

    Attributes:
        weights: ``[(E, M_l, M_{l−1})]`` for l = 1 … L; biases: ``[(E, M_l)]``.
        activation: name; phi, dphi: φ and φ' on tensors.
        sigma_w2, sigma_b2: the per-layer variances the parameters were drawn with.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    activation: str
    phi: TorchFn
    dphi: TorchFn
    sigma_w2: list[float]
    sigma_b2: list[float]

    @classmethod
    def from_normals(
        cls, Zw: Sequence[Tensor], Zb: Sequence[Tensor], activation: str | tuple[TorchFn, TorchFn],
        sigma_w2: float | Sequence[float], sigma_b2: float | Sequence[float],
    ) -> MLPEnsemble:
        """Scale standard normals to ``W^l = (σ_w²/M_{l−1})^{1/2} Z``, ``b^l = σ_b Z'`` (Karakida et al. 2019, eq 8).

        ``sigma_w2 > 0`` and ``sigma_b2 ≥ 0`` (finite; a number or one per layer), else ``ValueError``."""
        L = len(Zw)
        sw = _per_layer(sigma_w2, L, "sigma_w2", positive=True)
        sb = _per_layer(sigma_b2, L, "sigma_b2")
        name, phi, dphi = _torch_act(activation)
        W = [z * math.sqrt(s / z.shape[-1]) for z, s in zip(Zw, sw, strict=True)]
        b = [z * math.sqrt(s) for z, s in zip(Zb, sb, strict=True)]
        return cls(W, b, name, phi, dphi, sw, sb)

    @classmethod
    def sample(
        cls, E: int, sizes: Sequence[int], activation: str | tuple[TorchFn, TorchFn], sigma_w2: float | Sequence[float],
        sigma_b2: float | Sequence[float], generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> MLPEnsemble:
        """Draw E networks with widths ``sizes = [M_0, M_1, …, M_{L−1}, C]`` (positive integers; E ≥ 1)."""
        if not isinstance(E, int) or isinstance(E, bool) or E < 1:
            raise ValueError(f"E (the number of networks) must be a positive integer, got {E!r}.")
        if len(sizes) < 3 or not all(_positive_integer(m) for m in sizes):
            raise ValueError(f"sizes must be [M_0, …, M_{{L−1}}, C] with L ≥ 2 and positive integer entries, got "
                             f"{sizes!r}.")
        return cls.from_normals(*standard_normals(E, [int(m) for m in sizes], generator, dtype), activation,
                                sigma_w2, sigma_b2)

    @property
    def size(self) -> int:
        """E, the number of networks."""
        return self.weights[0].shape[0]

    @property
    def sizes(self) -> list[int]:
        """``[M_0, …, M_L]``."""
        return [self.weights[0].shape[2]] + [w.shape[1] for w in self.weights]

    @property
    def n_params(self) -> int:
        """P of one network."""
        return sum(w[0].numel() + b[0].numel() for w, b in zip(self.weights, self.biases, strict=True))

    def _inputs(self, X: Tensor) -> Tensor:
        W0 = self.weights[0]
        X = X.to(W0.dtype)
        if X.dim() == 2:
            X = X.expand(self.size, *X.shape)
        if X.dim() != 3 or X.shape[0] != self.size or X.shape[2] != W0.shape[2]:
            raise ValueError(
                f"inputs must be (T, {W0.shape[2]}) or ({self.size}, T, {W0.shape[2]}); got {tuple(X.shape)}."
            )
        return X

    def _forward(self, X: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Layer inputs ``[h^0 … h^{L−1}]`` and pre-activations ``[u^1 … u^L]``, each ``(E, T, ·)``."""
        H, U = [self._inputs(X)], []
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            u = torch.baddbmm(b[:, None, :], H[-1], W.transpose(1, 2))
            U.append(u)
            if i + 1 < len(self.weights):
                H.append(self.phi(u))
        return H, U

    def forward(self, X: Tensor) -> Tensor:
        """Outputs ``f (E, T, C)`` for inputs ``(T, M_0)`` (shared) or ``(E, T, M_0)``."""
        return self._forward(X)[1][-1]

    __call__ = forward

    def _deltas(self, U: list[Tensor]) -> list[Tensor]:
        """Back-propagated ``δ^l = ∂f/∂u^l`` ``(E, T, C, M_l)`` for l = 1 … L−1 (eq 7; δ^L is the identity)."""
        E, T, C = U[-1].shape
        D = [None] * (len(U) - 1)
        d = self.weights[-1].unsqueeze(1).expand(E, T, C, -1) * self.dphi(U[-2]).unsqueeze(2)  # δ^{L−1}
        D[-1] = d
        for i in range(len(U) - 3, -1, -1):  # δ^l = (δ^{l+1} W^{l+1}) ⊙ φ'(u^l)
            Wn = self.weights[i + 1]
            d = torch.bmm(d.reshape(E, T * C, -1), Wn).reshape(E, T, C, -1) * self.dphi(U[i]).unsqueeze(2)
            D[i] = d
        return D

    def gram(self, X: Tensor) -> Tensor:
        """Exact dual matrix ``F* = (1/T) Ĵ Ĵᵀ`` of every member, ``(E, TC, TC)`` ordered ``(t, k)``."""
        return self.measure(X, fisher_rao=False)[0]

    def fisher_rao(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Fisher–Rao norm of the weights, ``(θ_wᵀ F θ_w (E,), Σ_l (σ_{w,l}²/M_{l−1}) tr F_{W^l} (E,))``.

        The first is the norm of each network (eq 17, weights only): ``(1/T) Σ_{t,k} (Σ_l δ^l_k·(u^l − b^l))²``.
        The second replaces ``θ_i θ_j`` by its ensemble average ``δ_ij σ_i²`` (what Karakida et al. 2019, Theorem 5,
        evaluate).
        """
        _, fr, diag = self.measure(X, gram=False)
        return fr, diag

    def measure(self, X: Tensor, *, gram: bool = True, fisher_rao: bool = True):
        """One forward/backward pass giving ``(G (E, TC, TC) or None, fr (E,) or None, fr_diag (E,) or None)``,
        see :meth:`gram` and :meth:`fisher_rao`."""
        H, U = self._forward(X)
        E, T, C = U[-1].shape
        D = self._deltas(U)
        L = len(self.weights)
        G = fr = diag = None
        if gram:
            G = torch.zeros(E, T, C, T, C, dtype=U[-1].dtype, device=U[-1].device)
            for i in range(L):
                A = torch.baddbmm(torch.ones(1, 1, 1, dtype=G.dtype), H[i], H[i].transpose(1, 2))  # (E, T, T)
                if i == L - 1:  # δ^L_k · δ^L_k' = [k = k']
                    G += A[:, :, None, :, None] * torch.eye(C, dtype=G.dtype)[None, None, :, None, :]
                else:
                    Dm = D[i].reshape(E, T * C, -1)
                    G += torch.bmm(Dm, Dm.transpose(1, 2)).reshape(E, T, C, T, C) * A[:, :, None, :, None]
            G = G.reshape(E, T * C, T * C) / T
        if fisher_rao:
            v = U[-1] - self.biases[-1][:, None, :]  # (E, T, C): output layer, δ^L_k = e_k
            diag = (H[-1] ** 2).sum((1, 2)) * C * self.sigma_w2[-1] / H[-1].shape[-1]
            for i in range(L - 1):
                v = v + torch.einsum("etkm,etm->etk", D[i], U[i] - self.biases[i][:, None, :])
                dn = (D[i] ** 2).sum(-1)  # (E, T, C)
                diag = diag + (dn * (H[i] ** 2).sum(-1)[..., None]).sum((1, 2)) * self.sigma_w2[i] / H[i].shape[-1]
            fr, diag = (v**2).sum((1, 2)) / T, diag / T
        return G, fr, diag

    def module(self, e: int = 0) -> nn.Sequential:
        """Member ``e`` as an ``nn.Sequential`` of ``nn.Linear`` layers (for the library's Fisher functions)."""
        layers: list[nn.Module] = []
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            lin = nn.Linear(W.shape[2], W.shape[1], dtype=W.dtype)
            with torch.no_grad():
                lin.weight.copy_(W[e])
                lin.bias.copy_(b[e])
            layers.append(lin)
            if i + 1 < len(self.weights):
                layers.append(Elementwise(self.phi, self.activation))
        return nn.Sequential(*layers).eval()


def random_mlp(
    activation: str | tuple[TorchFn, TorchFn], sigma_w2: float | Sequence[float], sigma_b2: float | Sequence[float],
    sizes: Sequence[int], *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """One network of the mean-field ensemble (Karakida et al. 2019, eq 8) as an ``nn.Sequential``.

    ``sizes = [M_0, …, M_{L−1}, C]``.
    """
    return MLPEnsemble.sample(1, sizes, activation, sigma_w2, sigma_b2, generator, dtype).module(0)


def ensemble_stats(G: Tensor, n_params: int) -> dict[str, Tensor]:
    """The statistics of Karakida et al. (2019) from dual matrices ``G (E, n, n)``: ``mean = tr G / P``,
    ``second_moment = ‖G‖_F² / P`` (zeros of the P − n remaining eigenvalues included) and ``max`` (largest
    eigenvalue); each ``(E,)``.

    Same definitions as :func:`fisherlens.spectrum_stats` with ``dim=P``, batched over the ensemble.
    """
    G = G.detach().to(torch.float64)
    with single_thread():
        top = torch.linalg.eigvalsh(G)[..., -1]
    return {
        "mean": G.diagonal(dim1=-2, dim2=-1).sum(-1) / n_params,
        "second_moment": (G * G).sum((-2, -1)) / n_params,
        "max": top,
    }


@contextmanager
def single_thread():
    """Run torch on one intra-op thread inside the block (restored after).

    Batched eigen-decompositions of many ~100 × 100 matrices gain nothing from threads, and multi-threaded
    LAPACK stalls badly (seconds instead of milliseconds) when the machine's cores are oversubscribed.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
