r"""Analytic layer structure of the Fisher of a multilayer perceptron (Luzzatto 2023, §4.2, eqs 4.7–4.9).

For an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (optionally ending in a
``Softmax``/``LogSoftmax``) the per-input Jacobian has a closed form, and so has every Fisher view.

Notation (one input ``x``; layers ``l = 1..L``; ``n_l`` units; ``u_l = x_{l-1}`` the input of layer l):

    a_l = W_l u_l + b_l,      x_l = φ_l(a_l),      f = x_L = φ_L(a_L)  (C = n_L outputs).

``D_L = ∂f/∂a_L`` is ``diag φ_L'(a_L)`` for an elementwise output map, the full ``C×C`` matrix
``diag(π) − π πᵀ`` for a softmax output (``I − 1 πᵀ`` for log-softmax).  With the kind's sandwich
``V (C×K)`` (``V Vᵀ = Λ(f)``, e.g. ``I/σ`` for ``fl.Gaussian(σ)``, ``diag(√π) − π√πᵀ`` for
``fl.Categorical()`` on logits; see :mod:`fisherlens._core`) define the back-propagated *output factors*

    M_L = Vᵀ D_L  (K×n_L),      M_{l-1} = M_l W_l diag φ_{l-1}'(a_{l-1})  (K×n_{l-1}).

The factor rows ``G = Vᵀ J`` (K×P) are then Khatri–Rao products, per parameter tensor p of layer l:
``G[:, W_l] = M_l ⊗ u_lᵀ`` (entry ``(k, μ·n_{l-1}+α) = M_l[k,μ] u_l[α]``, nn.Linear's row-major layout) and
``G[:, b_l] = M_l``.  Hence, for one input,

* **blocks** (eq 4.9): ``F[p, q] = A_{lm} ⊗ B_{pq}`` with ``A_{lm} = M_lᵀ M_m`` (n_l×n_m) and
  ``B_{pq} = u_p u_qᵀ`` where ``u_p = u_l`` for a weight and ``u_p = [1]`` for a bias;
* **Gram** (the C×C dual, docs/conventions.md#gram-duality): ``G Gᵀ = Σ_l M_l M_lᵀ (‖u_l‖² + 1)`` (the ``+1``
  only with a bias);
* **eigenvectors**: a Gram eigenpair ``(λ, w)`` gives the Fisher eigenvector ``v = Gᵀ w/√λ``, per layer
  ``v[W_l] = (M_lᵀ w) u_lᵀ/√λ`` — a rank-one ``n_l × n_{l-1}`` matrix: in the first layer every hidden
  unit's incoming-weight pattern is a multiple of the input itself.

Luzzatto (2023) writes these for zero (eq 4.7) and one (eqs 4.8a–c) hidden layer, Gaussian output model, no biases
and elementwise φ₂: there ``K = C``, ``V = I/σ``, ``M_2 = diag φ₂'(a₂)/σ``, ``A_{22} = diag φ₂'(a₂)²/σ²``
(4.8a), ``A_{11} = Φ₁' W₂ᵀ Φ₂'² W₂ Φ₁'/σ²`` (4.8b, with the thesis's typo φ₀′ → φ₁′), ``A_{12}`` (4.8c).
Here the same formulas hold at any depth, with biases, for softmax outputs (``D_L`` a full matrix, so
``A_{LL} = D_L Λ D_L`` is no longer diagonal) and for any output model with a Fisher.

Data-averaged quantities (``N`` inputs) are the usual means ``F = (1/N) Σ_n G_nᵀ G_n`` (``reduction="sum"``
drops the 1/N); their NK×NK Gram has blocks ``(1/N) Σ_l M_{l,n} M_{l,m}ᵀ (u_{l,n}·u_{l,m} + 1)``.
Everything is batched tensor algebra: no autograd through the parameters, no loop over inputs.
Parameter order: the model's parameters with ``requires_grad``, flattened in ``named_parameters()`` order,
as in :func:`fisherlens.fisher_matrix`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp

from ._core import check_choice, check_dense, check_kind, work_budget
from .results import Eigen, split_flat

Tensor = torch.Tensor

__all__ = ["Factors", "KhatriRao", "Eigen", "factors", "factor_sizes", "per_input_fisher", "data_fisher", "SUPPORTED"]

#: parameter-free elementwise maps (any depth of them may follow a Linear).
ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardsigmoid,
    nn.Hardswish, nn.Dropout,
)
#: output maps with a full Jacobian (allowed as the last module only).
OUTPUT_MAPS = (nn.Softmax, nn.LogSoftmax)
SUPPORTED = (
    "nn.Sequential (nested ones flattened; or a single nn.Linear) of nn.Linear layers (with or without bias) and "
    "parameter-free elementwise activations (" + ", ".join(m.__name__ for m in ELEMENTWISE) + "), optionally ending in "
    "nn.Softmax/nn.LogSoftmax over the last dimension; nn.Flatten and elementwise maps may precede the first Linear"
)
WHAT_ONE = ("dense", "blocks", "gram", "eigenvalues", "eigh")
WHAT_DATA = ("dense", "gram", "eigenvalues", "eigh")


# ----------------------------------------------------------------------------- model parsing
@dataclass
class _Layer:
    linear: nn.Linear
    acts: list[nn.Module]  # elementwise maps after the Linear
    out_map: nn.Module | None = None  # Softmax/LogSoftmax (last layer only)
    wname: str | None = None  # selected parameter names (None: frozen or absent)
    bname: str | None = None


def _unsupported(where: str, m: nn.Module, why: str) -> TypeError:
    return TypeError(
        f"fl.structure cannot handle module {where} ({type(m).__name__}): {why}. Supported: {SUPPORTED}. "
        "For other models use fl.fisher_matrix or fl.eigenvalues(method='gram')."
    )


def _items(seq: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Modules of a Sequential in call order, nested Sequentials flattened (``_modules``, not
    ``named_children()``, which hides a module used twice)."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in seq._modules.items():
        if isinstance(m, nn.Sequential):
            out += _items(m, f"{prefix}{name}.")
        elif m is not None:
            out.append((f"{prefix}{name}", m))
    return out


def parse_mlp(model: nn.Module) -> tuple[list[nn.Module], list[_Layer], list[str]]:
    """``(prep, layers, names)``: input preprocessing modules, the Linear layers, selected parameter names."""
    if isinstance(model, nn.Linear):
        items = [("", model)]
    elif isinstance(model, nn.Sequential):
        items = _items(model)
    else:
        raise TypeError(
            f"fl.structure needs an nn.Sequential (or nn.Linear), got {type(model).__name__}. Supported: "
            f"{SUPPORTED}. For other models use fl.fisher_matrix or fl.eigenvalues(method='gram')."
        )
    prep: list[nn.Module] = []
    layers: list[_Layer] = []
    for i, (name, m) in enumerate(items):
        where = f"'{name}'" if name else "model"
        if isinstance(m, nn.Linear):
            if layers and layers[-1].out_map is not None:
                raise _unsupported(where, m, "a Softmax/LogSoftmax must be the last module")
            layers.append(_Layer(m, []))
            continue
        if any(True for _ in m.parameters()):
            raise _unsupported(where, m, "only nn.Linear layers may carry parameters")
        if isinstance(m, nn.Dropout) and m.training and m.p > 0:
            raise ValueError(f"Module {where} is Dropout in training mode (the model is random); call model.eval().")
        if isinstance(m, OUTPUT_MAPS):
            if m.dim not in (None, -1, 1):
                raise _unsupported(where, m, f"dim={m.dim}; only the last dimension (dim=-1 or 1) is supported")
            if not layers or i != len(items) - 1:
                raise _unsupported(where, m, "a Softmax/LogSoftmax is supported only as the last module")
            layers[-1].out_map = m
        elif isinstance(m, ELEMENTWISE):
            (layers[-1].acts if layers else prep).append(m)
        elif isinstance(m, nn.Flatten) and not layers:
            prep.append(m)
        else:
            raise _unsupported(where, m, "not a Linear layer or a known elementwise activation")
    if not layers:
        raise TypeError(f"fl.structure found no nn.Linear layer in the model. Supported: {SUPPORTED}.")
    ids = {id(p): n for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("No parameter of the model requires grad: the Fisher has no parameters.")
    for ly in layers:
        w, b = ly.linear.weight, ly.linear.bias
        ly.wname = ids[id(w)] if w.requires_grad else None
        ly.bname = ids[id(b)] if b is not None and b.requires_grad else None
    used = [n for ly in layers for n in (ly.wname, ly.bname) if n is not None]
    if len(set(used)) != len(used):
        raise _unsupported("list", layers[0].linear, "a Linear layer is used twice (shared weights)")
    return prep, layers, names


def _chain(mods: list[nn.Module], a: Tensor) -> tuple[Tensor, Tensor]:
    """Value and elementwise derivative ``(φ(a), φ'(a))`` of a chain of elementwise maps (one jvp)."""
    if not mods:
        return a, torch.ones_like(a)

    def phi(z):
        for m in mods:
            z = m(z)
        return z

    return jvp(phi, (a,), (torch.ones_like(a),))


# ----------------------------------------------------------------------------- the factors
@dataclass
class Factors:
    r"""Khatri–Rao factors of the per-input factor rows ``G_n = V_nᵀ J_n`` of ``N`` inputs.

    Attributes:
        names: selected parameter names (``named_parameters()`` order); ``shapes``: their shapes.
        layer: parameter name → index l of its Linear layer; ``bias``: name → whether it is a bias.
        inputs: per layer, ``u_l (N, n_{l-1})``, the layer's input.
        M: per layer, the output factor ``M_l (N, K, n_l)`` (module doc).
        outputs: the model's outputs ``f (N, C)``; ``V``: the sandwich ``(N, C, K)``.
    """

    names: list[str]
    shapes: dict[str, torch.Size]
    layer: dict[str, int]
    bias: dict[str, bool]
    inputs: list[Tensor]
    M: list[Tensor]
    outputs: Tensor
    V: Tensor

    @property
    def N(self) -> int:
        return self.outputs.shape[0]

    @property
    def K(self) -> int:
        return self.V.shape[-1]

    @property
    def P(self) -> int:
        return sum(s.numel() for s in self.shapes.values())

    def u(self, name: str) -> Tensor:
        """The input factor ``u_p (N, ·)``: the layer input for a weight, ones ``(N, 1)`` for a bias."""
        x = self.inputs[self.layer[name]]
        return x.new_ones(x.shape[0], 1) if self.bias[name] else x

    def rows(self, sl: slice = slice(None)) -> Tensor:
        """Factor rows ``G_n (n, K, P)`` of the inputs ``sl``: ``M_l ⊗ u_p`` per parameter."""
        out = [torch.einsum("nko,ni->nkoi", self.M[self.layer[p]][sl], self.u(p)[sl]).flatten(2) for p in self.names]
        return torch.cat(out, dim=-1)

    def weights(self) -> list[Tensor]:
        """Per layer ``s_l = ‖u_l‖²·[weight selected] + [bias selected]``, shape ``(N,)`` (the Gram's scalars)."""
        s = [self.inputs[i].new_zeros(self.N) for i in range(len(self.M))]
        for p in self.names:
            s[self.layer[p]] = s[self.layer[p]] + (1.0 if self.bias[p] else self.inputs[self.layer[p]].square().sum(-1))
        return s

    def grams(self) -> Tensor:
        """Per-input duals ``G_n G_nᵀ = Σ_l s_l M_l M_lᵀ``, shape ``(N, K, K)``."""
        out = None
        for Ml, s in zip(self.M, self.weights(), strict=True):
            g = (Ml @ Ml.transpose(1, 2)) * s[:, None, None]
            out = g if out is None else out + g
        return out

    def gram(self, scale: float = 1.0) -> Tensor:
        """The data Gram ``scale · Ĝ Ĝᵀ``, shape ``(N·K, N·K)``, block (n, m) = ``Σ_l M_{l,n} M_{l,m}ᵀ κ_l(n, m)``,
        ``κ_l = u_l·u_l'`` (weight selected) ``+ 1`` (bias selected).

        Products and sums in float64 whatever the factors' dtype (float32 factors lose nothing to the length-n_l
        sums); returns float64."""
        N, K = self.N, self.K
        out = None
        for i, Ml in enumerate(self.M):
            kern = None
            for p in self.names:
                if self.layer[p] != i:
                    continue
                u = self.inputs[i].double()
                k = u.new_ones(N, N) if self.bias[p] else u @ u.T
                kern = k if kern is None else kern + k
            if kern is None:
                continue
            flat = Ml.reshape(N * K, -1).double()
            g = (flat @ flat.T).view(N, K, N, K).mul_(kern[:, None, :, None] * scale)
            out = g if out is None else out.add_(g)
        return out.view(N * K, N * K)

    def pullback(self, W: Tensor) -> Tensor:
        """``Σ_n G_nᵀ W_n`` for ``W (N, K, r)``, flat ``(P, r)`` — no P×NK matrix is formed."""
        T = [W.transpose(1, 2) @ Ml for Ml in self.M]  # (N, r, n_l): Σ_k W[n,k,r] M_l[n,k,o]
        parts = [torch.einsum("nro,ni->roi", T[self.layer[p]], self.u(p)).reshape(W.shape[-1], -1) for p in self.names]
        return torch.cat(parts, dim=-1).T

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split ``v (..., P)`` into ``{name: (..., *shape)}`` (e.g. a first-layer eigenvector as ``(H, 784)``)."""
        return split_flat(v, self.names, self.shapes)


def factors(model: nn.Module, X: Tensor, likelihood, kind: str = "true", *, y: Tensor | None = None,
            samples: int = 1, generator: torch.Generator | None = None) -> Factors:
    """The Khatri–Rao factors of ``N`` inputs ``X (N, ...)`` (module doc): one batched forward, no autograd.

    Args:
        model: see :data:`SUPPORTED`; ``TypeError`` naming the offending module otherwise.
        X: a batch of inputs ``(N, ...)``, cast to the model's dtype.
        likelihood, kind, y, samples, generator: the sandwich, as in :func:`fisherlens.fisher_matrix`
            (``y`` are the labels, needed for ``kind="empirical"``).

    Returns:
        :class:`Factors`.
    """
    check_kind(likelihood, kind)
    prep, layers, names = parse_mlp(model)
    h = _first_input(prep, layers, X)
    W0 = layers[0].linear.weight
    dtype, dev = W0.dtype, W0.device
    derivs: list[Tensor] = []  # φ_l'(a_l), elementwise part
    inputs: list[Tensor] = []
    with torch.no_grad():
        for ly in layers:
            inputs.append(h)
            a = ly.linear(h)
            h, d = _chain(ly.acts, a)
            derivs.append(d)
        out_map = layers[-1].out_map
        if out_map is not None:
            if isinstance(out_map, nn.Softmax):
                pi = torch.softmax(h, -1)
                Jout = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
                f = pi
            else:
                logp = torch.log_softmax(h, -1)
                pi = logp.exp()
                Jout = torch.eye(h.shape[1], dtype=dtype, device=dev) - pi[:, None, :]
                f = logp
        else:
            f = h
    if not torch.isfinite(f).all():
        raise ValueError("The model produced NaN or inf outputs on these inputs; the Fisher is undefined there.")
    if kind == "empirical" and y is None:
        raise ValueError("kind='empirical' needs the labels: pass y=.")
    V = likelihood.sandwich(f, kind, None if y is None else y.to(dev), samples, generator)  # (N, C, K)
    # M_L = Vᵀ D_L, D_L = J_out diag(φ_L')
    Vt = V.transpose(1, 2)
    M_last = (Vt @ Jout if out_map is not None else Vt) * derivs[-1][:, None, :]
    Ms = [M_last]
    for i in range(len(layers) - 1, 0, -1):
        Ms.append((Ms[-1] @ layers[i].linear.weight.detach()) * derivs[i - 1][:, None, :])
    Ms.reverse()
    layer, bias, shapes = {}, {}, {}
    for i, ly in enumerate(layers):
        for n, isb in ((ly.wname, False), (ly.bname, True)):
            if n is not None:
                layer[n], bias[n] = i, isb
    named = dict(model.named_parameters())
    for n in names:
        if n not in layer:  # defensive: parse_mlp guarantees every parameter belongs to a Linear
            raise TypeError(f"Parameter '{n}' does not belong to a Linear layer of the model. Supported: {SUPPORTED}.")
        shapes[n] = named[n].shape
    return Factors(names, shapes, layer, bias, inputs, Ms, f, V)


def _first_input(prep: list[nn.Module], layers: list[_Layer], X: Tensor, shape=None) -> Tensor:
    """The first Linear's input ``(N, in_features)`` from ``X (N, ...)`` (cast to the model's dtype and device, the
    preprocessing modules applied); ``TypeError``/``ValueError`` for inputs the model cannot take (messages name
    ``shape``, default ``X.shape``)."""
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a tensor of inputs (N, ...), got {type(X).__name__}.")
    if X.dim() < 1 or len(X) == 0:
        raise ValueError(f"X must be a non-empty batch of inputs (N, ...), got shape {tuple(X.shape)}.")
    W0 = layers[0].linear.weight
    h = X.to(W0.device, W0.dtype, copy=bool(prep))  # copy: an in-place activation before the first Linear keeps X
    with torch.no_grad():
        for m in prep:
            h = m(h)
    if h.dim() != 2 or h.shape[1] != layers[0].linear.in_features:
        raise ValueError(
            f"Inputs of shape {tuple(X.shape if shape is None else shape)} reach the first Linear as "
            f"{(len(X) if shape is None else shape[0], *h.shape[1:])}; it needs "
            f"(N, {layers[0].linear.in_features}). Pass a batch (N, ...) of inputs shaped for the model."
        )
    return h


def factor_sizes(model: nn.Module, X: Tensor, likelihood, kind: str = "true", *,
                 samples: int = 1) -> tuple[int, int, int]:
    """``(N, K, P)`` of :func:`factors` for inputs ``X (N, ...)`` from shapes alone — no factor is built, so that
    a result too large for memory (the ``N·K × N·K`` Gram, ``P × P`` dense Fishers) is refused before allocating.

    ``K`` is the sandwich's columns (``C`` outputs for ``kind="true"``, 1 for ``"empirical"``, ``samples`` for
    ``"mc"``), ``P`` the number of selected parameters.  Raises as :func:`factors` does for unsupported models and
    inputs (the preprocessing runs on the first input only)."""
    return _sizes(model, X, likelihood, kind, samples)[:3]


def _sizes(model: nn.Module, X: Tensor, likelihood, kind: str, samples: int) -> tuple[int, int, int, int]:
    """``(N, K, P, itemsize)`` of :func:`factor_sizes`, with the model's bytes per number."""
    check_kind(likelihood, kind)
    prep, layers, names = parse_mlp(model)
    if isinstance(X, Tensor) and X.dim() >= 1:
        _first_input(prep, layers, X[:1], X.shape)
    else:
        _first_input(prep, layers, X)
    C = layers[-1].linear.out_features
    K = {"empirical": 1, "mc": samples}.get(kind, C)
    params = dict(model.named_parameters())
    return len(X), K, sum(params[n].numel() for n in names), layers[0].linear.weight.element_size()


# ----------------------------------------------------------------------------- results
@dataclass
class KhatriRao:
    r"""The block form of eq 4.9 for one input: ``F[p, q] = A[l(p)][l(q)] ⊗ (u_p u_qᵀ)``.

    Attributes:
        names: parameter names; ``shapes``: their shapes; ``layer``: name → layer index.
        A: ``A[l][m] = M_lᵀ M_m``, shape ``(n_l, n_m)`` (Luzzatto 2023's ``A_{ij}``; with a leading ``N`` when batched).
        u: name → input factor ``u_p`` (the layer input for a weight, ``[1]`` for a bias).
    """

    names: list[str]
    shapes: dict[str, torch.Size]
    layer: dict[str, int]
    A: list[list[Tensor]]
    u: dict[str, Tensor]

    def B(self, p: str, q: str) -> Tensor:
        """``B_pq = u_p u_qᵀ`` (Luzzatto 2023's ``B_{ij}``)."""
        return self.u[p][..., :, None] * self.u[q][..., None, :]

    def block(self, p: str, q: str) -> Tensor:
        """The dense block ``F[p, q] = A ⊗ B``, shape ``(numel_p, numel_q)`` (flattened like the parameters)."""
        A, B = self.A[self.layer[p]][self.layer[q]], self.B(p, q)
        out = A[..., :, None, :, None] * B[..., None, :, None, :]
        return out.reshape(*A.shape[:-2], A.shape[-2] * B.shape[-2], A.shape[-1] * B.shape[-1])

    def to_dense(self) -> Tensor:
        """The whole ``F (P, P)`` (or ``(N, P, P)``) assembled from the blocks."""
        return torch.cat([torch.cat([self.block(p, q) for q in self.names], -1) for p in self.names], -2)


def _eigen(G: Tensor, fa: Factors, W_shape, scale: float, batched: bool) -> Eigen:
    """Eigen-decomposition of the Gram ``G`` and the pull-back ``v = Gᵀw/√(λ/scale)`` of its eigenvectors."""
    vals, W = torch.linalg.eigh(G)
    dtype = fa.outputs.dtype  # G may be the float64 data Gram: eigenpairs computed in float64, returned in dtype
    vals, W = vals.flip(-1).clamp_min(0.0).to(dtype), W.flip(-1).to(dtype)
    R = vals.shape[-1]
    tol = R * torch.finfo(vals.dtype).eps * vals[..., :1]
    keep = vals > tol
    if batched:  # G (N, K, K): W (N, K, R) is already per input
        T = [W.transpose(1, 2) @ Ml for Ml in fa.M]  # (N, R, n_l)
        parts = [(T[fa.layer[p]][..., None] * fa.u(p)[:, None, None, :]).flatten(2) for p in fa.names]
        U = torch.cat(parts, -1).transpose(1, 2)  # (N, P, R)
    else:
        U = fa.pullback(W.reshape(*W_shape, R))  # (P, R)
    norm = torch.sqrt(torch.where(keep, vals / scale, torch.ones_like(vals)))
    U = torch.where(keep[..., None, :], U / norm[..., None, :], torch.zeros_like(U))
    rank = keep.sum(-1)
    return Eigen(vals, U, rank if batched else int(rank), fa.names, fa.shapes)


# ----------------------------------------------------------------------------- public functions
def per_input_fisher(model: nn.Module, x: Tensor, likelihood, what: str = "dense", *, kind: str = "true",
                     y: Tensor | None = None, batched: bool = False, samples: int = 1,
                     generator: torch.Generator | None = None, max_memory: int | None = None):
    r"""The Fisher of one input (Luzzatto 2023, eq 4.6: ``F = J(x)ᵀ Λ(f(x)) J(x)``), from the layer structure.

    Args:
        model: ``nn.Sequential`` of Linear layers and elementwise activations, optional final Softmax
            (:data:`SUPPORTED`); any depth (Luzzatto 2023 treats 0 and 1 hidden layers).
        x: one input without batch dimension (e.g. ``(784,)``); with ``batched=True`` a batch ``(N, ...)``
            and every result gets a leading ``N`` (the N per-input Fishers, not their mean).
        likelihood: ``fl.Gaussian(σ)`` (Luzzatto 2023, eq 4.5), ``fl.Categorical()`` (on the outputs as logits),
            ``fl.Bernoulli()``, or ``fl.LossInduced`` with ``kind="empirical"``.
        what: ``"dense"`` — ``F (P, P)``; ``"blocks"`` — :class:`KhatriRao` (eq 4.9); ``"gram"`` — the
            ``K×K`` dual ``G Gᵀ = Σ_l s_l M_l M_lᵀ``; ``"eigenvalues"`` — its eigenvalues ``(K,)``, descending
            (all nonzero Fisher eigenvalues; equal to ``fl.eigenvalues(model, x[None], lik, method="gram")``);
            ``"eigh"`` — :class:`Eigen` with the eigenvectors in parameter space.
        kind, y, samples, generator: the sandwich as in :func:`fisherlens.fisher_matrix` (``y``: the label(s)).
        max_memory: bytes allowed for a dense result (default: half the available memory).

    Returns:
        As chosen by ``what``.  ``K = C`` for ``kind="true"``.  Parameter order as :func:`fisherlens.fisher_matrix`.
    """
    check_choice("what", what, WHAT_ONE)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}.")
    X = x if batched else x[None]
    if y is not None and not batched:
        y = torch.as_tensor(y).reshape(1, *torch.as_tensor(y).shape)
    if what == "dense":  # refused from the shapes, before any factor is built
        N, _, P, item = _sizes(model, X, likelihood, kind, samples)
        check_dense(f"{N} dense per-input Fisher(s) with P={P}", N * P**2, item,
                    "Use what='gram', 'eigenvalues', 'eigh' or 'blocks'", max_memory)
    fa = factors(model, X, likelihood, kind, y=y, samples=samples, generator=generator)
    out = _per_input(fa, what)
    if batched or what in ("blocks", "eigh"):
        return out if batched else _unbatch(out)
    return out[0]


def _per_input(fa: Factors, what: str):
    if what == "dense":  # the caller checked the memory
        R = fa.rows()
        return R.transpose(1, 2) @ R
    if what == "blocks":
        A = [[Ml.transpose(1, 2) @ Mm for Mm in fa.M] for Ml in fa.M]
        return KhatriRao(fa.names, fa.shapes, fa.layer, A, {p: fa.u(p) for p in fa.names})
    G = fa.grams()
    if what == "gram":
        return G
    if what == "eigenvalues":
        return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0)
    return _eigen(G, fa, None, 1.0, batched=True)


def _unbatch(out):
    if isinstance(out, KhatriRao):
        return KhatriRao(out.names, out.shapes, out.layer, [[a[0] for a in row] for row in out.A],
                         {p: u[0] for p, u in out.u.items()})
    return Eigen(out.values[0], out.vectors[0], int(out.rank[0]), out.names, out.shapes)


def data_fisher(model: nn.Module, X: Tensor, likelihood, what: str = "dense", *, kind: str = "true",
                y: Tensor | None = None, reduction: str = "mean", samples: int = 1,
                generator: torch.Generator | None = None, max_memory: int | None = None):
    r"""The data-averaged Fisher ``F = (1/N) Σ_n J_nᵀ Λ_n J_n`` of inputs ``X (N, ...)``, from the layer structure.

    Args:
        what: ``"dense"`` — ``F (P, P)``, accumulated from Khatri–Rao rows in chunks; ``"gram"`` — the
            ``NK×NK`` dual ``(1/N) Ĝ Ĝᵀ`` (module doc; equal to the Gram of ``fl.eigenvalues(method="gram")``);
            ``"eigenvalues"`` — its eigenvalues, descending ``(NK,)``; ``"eigh"`` — :class:`Eigen`.
        reduction: ``"mean"`` (1/N) or ``"sum"``.
        Others: as in :func:`per_input_fisher`.
    """
    check_choice("what", what, WHAT_DATA)
    check_choice("reduction", reduction, ("mean", "sum"))
    N, K, P, item = _sizes(model, X, likelihood, kind, samples)  # refused from the shapes, before the factors
    if what == "dense":
        check_dense(f"the dense Fisher with P={P}", P**2, item, "Use what='gram' or 'eigh'", max_memory)
    else:  # the float64 Gram and one float64 temporary of its size
        check_dense(f"the Gram matrix of N·K = {N * K} rows (float64)", 2 * (N * K) ** 2, 8, "Use fewer inputs",
                    max_memory)
    fa = factors(model, X, likelihood, kind, y=y, samples=samples, generator=generator)
    scale = 1.0 / fa.N if reduction == "mean" else 1.0
    if what == "dense":
        out = fa.outputs.new_zeros(fa.P, fa.P)
        step = max(1, work_budget() // (2 * max(1, fa.K * fa.P * item)))
        for i in range(0, fa.N, step):
            R = fa.rows(slice(i, i + step)).reshape(-1, fa.P)
            out.addmm_(R.T, R)
        return out.mul_(scale)
    G = fa.gram(scale)  # float64; results in the model's dtype
    if what == "gram":
        return G.to(fa.outputs.dtype)
    if what == "eigenvalues":
        return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0).to(fa.outputs.dtype)
    return _eigen(G, fa, (fa.N, fa.K), scale, batched=False)
