"""Shared primitives: functional model, data streaming, the Fisher "sandwich", per-sample factor rows.

Every Fisher-type object in fisherlens is a reduction of the per-sample *factor rows*

    G_n = V_nᵀ J_n ∈ R^{K×P},   J_n = ∂f_θ(x_n)/∂θ ∈ R^{C×P},   V_n ∈ R^{C×K},

with the *sandwich* ``V_n`` chosen by the kind (SCIENCE §3):

* ``true``       V_n = S_n, a square root of Λ(f_n)       (K = C),
* ``empirical``  V_n = r_n = ∂ℓ/∂f at the observed label   (K = 1),
* ``mc``         V_n = [r_n(ŷ_1) … r_n(ŷ_k)]/√k, ŷ ~ p(y|f_n)  (K = k),
* NTK            V_n = I                                   (K = C),

so that ``F = (1/N) Σ_n G_nᵀ G_n``.  Index letters in einsums: ``k`` sandwich column, ``b`` sample,
``o`` layer output, ``i`` layer input, ``l`` spatial location.

Two engines produce the per-batch statistics (diag Σ G², per-sample Gram G Gᵀ, or the rows G):

* **layerwise** (fast): for parameters owned by ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` the rows are
  outer products of the layer input ``a_b`` and the back-propagated output gradient ``g_kb``.  One forward
  and one backward pass batched over the K columns (``autograd.grad(..., is_grads_batched=True)``, i.e.
  ``vmap`` over cotangents) give all ``g``; for a layer used once on a ``(B, I)`` input diag and Gram
  follow without materialising rows (``Σ g²a²``, ``(g_k·g_l)‖a‖²``).  The attribution is verified once per
  model/input signature against autograd (a parameter also used outside its layer falls back).
* **functional** (general): ``torch.func.vmap`` over samples of ``torch.func.vjp`` of the functional model,
  itself vmapped over the K columns — any module ``functional_call`` supports.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from .likelihoods import Likelihood

Tensor = torch.Tensor

KINDS = ("true", "empirical", "mc")
REDUCTIONS = ("mean", "sum")
ENGINES = ("auto", "layerwise", "functional")

#: working-memory budget (bytes) for per-sample rows in one chunk; results are never chunked away.
WORK_BUDGET = 512 * 2**20


# ----------------------------------------------------------------------------- validation helpers
def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def check_kind(likelihood, kind: str) -> None:
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a fisherlens output model such as fl.Categorical(), fl.Gaussian(sigma), "
            f"fl.Bernoulli() or fl.LossInduced(loss); got {likelihood!r}."
        )
    check_choice("kind", kind, KINDS)
    if kind != "empirical" and not likelihood.has_fisher:
        raise ValueError(
            f"{likelihood!r} defines only the empirical Fisher (its normaliser is unknown, so neither the "
            f"true Fisher nor label sampling exists); use kind='empirical', or an output model such as "
            "fl.Gaussian()/fl.Categorical() for kind='true'/'mc'."
        )


def available_memory() -> int:
    """Bytes of memory currently available (Linux ``sysconf``; a generous guess elsewhere)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def check_dense(what: str, numel: int, itemsize: int, alternative: str, max_memory: int | None) -> None:
    """Refuse, before allocating, a dense result that would not fit in memory."""
    need = numel * itemsize
    limit = max_memory if max_memory is not None else available_memory() // 2
    if need > limit:
        raise ValueError(
            f"{what} would need {need / 2**30:.2f} GiB but only {limit / 2**30:.2f} GiB may be used. "
            f"{alternative} (or pass max_memory=bytes to raise the limit)."
        )


# ----------------------------------------------------------------------------- functional model
def _module_prefix_match(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


class FunctionalModel:
    """A module seen as a function ``f(p, x) -> (B, C)`` of the selected parameters ``p`` (a dict).

    ``params`` selects a subset by parameter name, module-name prefix or tensor identity;
    default: all parameters with ``requires_grad``.  Flat vectors follow ``named_parameters()`` order.
    """

    def __init__(self, model: nn.Module, params=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    f"Module '{name or type(m).__name__}' is a BatchNorm layer in training mode, which mixes "
                    "the samples of a batch, so per-sample Fisher quantities are undefined. Call model.eval() first."
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"Module '{name or type(m).__name__}' is Dropout in training mode, which makes the model "
                    "random. Call model.eval() first."
                )
        self.model = model
        named = dict(model.named_parameters())
        if not named:
            raise ValueError("The model has no parameters.")
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
            if not chosen:
                raise ValueError("No parameter of the model requires grad; pass params= to choose some.")
        else:
            items = [params] if isinstance(params, (str, Tensor)) else list(params)
            if not items:
                raise ValueError("params= is empty; pass names or tensors of the model's parameters.")
            by_id = {id(p): n for n, p in named.items()}
            wanted = set()
            for it in items:
                if isinstance(it, Tensor):
                    if id(it) not in by_id:
                        raise ValueError("A tensor in params= is not a parameter of this model.")
                    wanted.add(by_id[id(it)])
                elif isinstance(it, str):
                    hits = [n for n in named if _module_prefix_match(n, it)]
                    if not hits:
                        raise ValueError(
                            f"params= names {it!r}, which is neither a parameter nor a module of the model. "
                            f"Parameters: {', '.join(named)}."
                        )
                    wanted.update(hits)
                else:
                    raise TypeError(f"params= entries must be names or parameter tensors, got {type(it).__name__}.")
            chosen = [n for n in named if n in wanted]
        self.names: list[str] = chosen
        self.tensors: dict[str, Tensor] = {n: named[n] for n in chosen}
        if not torch.isfinite(torch.stack([p.detach().sum() for p in self.tensors.values()])).all():
            for n, p in self.tensors.items():  # name the culprit (a finite overflow of the sum is fine)
                if not torch.isfinite(p).all():
                    raise ValueError(f"Parameter '{n}' contains NaN or inf; the Fisher is undefined there.")
        self.params: dict[str, Tensor] = {n: p.detach() for n, p in self.tensors.items()}
        #: the other parameters, detached, so that no result stays attached to the model's autograd graph
        self.frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in self.tensors}
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.P = sum(self.sizes.values())
        first = next(iter(self.params.values()))
        self.dtype, self.device, self.itemsize = first.dtype, first.device, first.element_size()
        # torch.func.functional_call does not restore the parameters of a module that occurs twice in the module
        # tree (e.g. nn.Sequential(lin, act, lin)): they come back as plain tensors and drop out of
        # named_parameters().  Remember them, and put them back after every call.
        count: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            count[id(m)] = count.get(id(m), 0) + 1
        self._restore = [
            (store, k, t)
            for _, m in model.named_modules()
            if count[id(m)] > 1
            for store in (m._parameters, m._buffers)
            for k, t in store.items()
            if t is not None
        ]

    def __call__(self, p: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(B, C)`` for inputs ``x (B, ...)``; a 1-D output is taken as ``C = 1``."""
        try:
            out = functional_call(self.model, {**self.frozen, **p}, (x,))
        finally:
            for store, k, t in self._restore:
                store[k] = t
        if not isinstance(out, Tensor):
            raise TypeError(f"The model must return a tensor of outputs (batch, C); it returned {type(out).__name__}.")
        if out.dim() == 1:
            out = out[:, None]
        elif out.dim() != 2:
            raise ValueError(
                f"The model must map a batch to outputs of shape (batch, C); got {tuple(out.shape)}. "
                "Flatten extra output dimensions in a wrapper module."
            )
        return out

    def flatten(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (with ``lead`` leading batch dims) into ``(..., P)``."""
        return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in self.names], dim=-1)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        if v.shape[-1] != self.P:
            raise ValueError(f"Expected a vector of length P={self.P}, got {tuple(v.shape)}.")
        out, i = {}, 0
        for n in self.names:
            out[n] = v[..., i : i + self.sizes[n]].reshape(*v.shape[:-1], *self.shapes[n])
            i += self.sizes[n]
        return out


# ----------------------------------------------------------------------------- data streaming
def _is_xy(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and (data[1] is None or isinstance(data[1], Tensor))
    )


def _split_batch(batch):
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) == 2 else None
        if y is not None and not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        return batch[0], y
    raise TypeError(
        f"Each batch must be a tensor X or a pair (X, Y) of tensors; got {type(batch).__name__}. "
        "Wrap dict-style datasets to return (X, Y)."
    )


def _slices(X: Tensor, Y: Tensor | None, bs: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    for i in range(0, len(X) if X.dim() else 0, bs):
        yield X[i : i + bs], None if Y is None else Y[i : i + bs]


def iter_batches(data, fm: FunctionalModel, *, need_y: bool, batch_size: int | None = None) -> Iterator:
    """Yield ``(X, Y)`` batches on the model's device; floating ``X`` cast to the model's dtype.

    ``data`` is ``(X, Y)`` tensors (split into chunks of ``batch_size``), a ``Dataset`` (read through a
    ``DataLoader``) or any iterable of batches (streamed: nothing is accumulated).  ``Y`` may be ``None``
    unless ``need_y``.  Raises ``ValueError`` for empty data or mismatched lengths.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, Tensor):
        data = (data, None)
    if _is_xy(data):
        X, Y = data
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"X has {len(X)} samples but Y has {len(Y)}; they must match.")
        source = _slices(X, Y, batch_size or 256)
    elif isinstance(data, torch.utils.data.Dataset):
        source = torch.utils.data.DataLoader(data, batch_size=batch_size or 256, shuffle=False)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        source = data
    else:
        raise TypeError(
            f"data must be a tuple (X, Y) of tensors, a torch Dataset or an iterable of (X, Y) batches; "
            f"got {type(data).__name__}."
        )
    seen = 0
    for batch in source:
        X, Y = _split_batch(batch)
        if X.dim() == 0 or len(X) == 0:
            continue
        if need_y and Y is None:
            raise ValueError("This quantity needs labels (e.g. kind='empirical'): pass data as (X, Y).")
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"A batch has {len(X)} inputs but {len(Y)} labels; they must match.")
        X = X.to(fm.device, fm.dtype) if torch.is_floating_point(X) else X.to(fm.device)
        if Y is not None:
            Y = Y.to(fm.device)
        seen += len(X)
        yield X, Y
    if seen == 0:
        raise ValueError("The data is empty: no samples to average over.")


@contextmanager
def _model_errors(X: Tensor):
    """Turn the model's failures on a batch into a ValueError that names the input shape."""
    try:
        yield
    except (RuntimeError, IndexError) as e:
        raise ValueError(
            f"The model failed on a batch of inputs of shape {tuple(X.shape)} (dtype {X.dtype}): {e}. "
            "Check that the data matches the model's input shape."
        ) from e


def _check_outputs(f: Tensor, X: Tensor) -> None:
    if f.shape[0] != X.shape[0]:
        raise ValueError(f"The model returned {f.shape[0]} outputs for a batch of {X.shape[0]} inputs.")
    if not torch.isfinite(f).all():
        raise ValueError("The model produced NaN or inf outputs on this data; the Fisher is undefined there.")


def forward_checked(fm: FunctionalModel, p, X: Tensor) -> Tensor:
    """``fm(p, X)`` with a clear error for inputs the model cannot take and for non-finite outputs."""
    with _model_errors(X):
        f = fm(p, X)
    _check_outputs(f, X)
    return f


def vjp_checked(fm: FunctionalModel, X: Tensor):
    """``(f (B, C), pull)``: one forward kept for pull-backs ``u (B, C) -> ({name: Jᵀu},)`` (torch.func.vjp)."""
    with _model_errors(X):
        f, pull = vjp(lambda q: fm(q, X), fm.params)
    _check_outputs(f, X)
    return f, pull


def jvp_checked(fm: FunctionalModel, X: Tensor, tangent: dict[str, Tensor], at: dict[str, Tensor] | None = None):
    """``(f (B, C), J t (B, C))`` for a tangent ``{name: tensor}`` (torch.func.jvp; vmap it over tangents), at the
    model's parameters or at ``at`` (same names)."""
    with _model_errors(X):
        f, jt = jvp(lambda q: fm(q, X), (fm.params if at is None else at,), (tangent,))
    _check_outputs(f, X)
    return f, jt


def quadratic_sum(fm: FunctionalModel, batches, likelihood: Likelihood, kind: str, v: dict[str, Tensor], *,
                  at: dict[str, Tensor] | None = None, samples: int = 1, generator=None) -> tuple[float, int]:
    """``(Σ_n ‖V_nᵀ J_n v‖², N)`` over ``(X, Y)`` batches: ``N · vᵀ F v`` matrix-free, one jvp per batch (at the
    model's parameters or at ``at``); F is never formed."""
    total, n = 0.0, 0
    for X, Y in batches:
        f, jt = jvp_checked(fm, X, v, at)
        V = sandwich(likelihood, kind, f, Y, samples, generator)
        total += torch.einsum("bck,bc->bk", V, jt).square().sum().item()
        n += len(X)
    return total, n


# ----------------------------------------------------------------------------- the sandwich V
def sandwich(likelihood: Likelihood, kind: str, f: Tensor, y, samples: int = 1, generator=None) -> Tensor:
    """The sandwich ``V (B, C, K)`` of the module doc, from detached outputs ``f (B, C)``."""
    f = f.detach()
    likelihood.check_outputs(f)
    if kind == "true":
        return likelihood.sqrt_fisher(f)
    if kind == "empirical":
        return likelihood.residual(f, likelihood.check_targets(f, y))[:, :, None]
    if kind == "mc":
        ys = likelihood.sample(f, samples, generator)  # (k, B, ...)
        fk = f.expand(samples, *f.shape).reshape(-1, f.shape[-1])
        r = likelihood.residual(fk, ys.reshape(-1, *ys.shape[2:]))
        return r.reshape(samples, *f.shape).permute(1, 2, 0) / math.sqrt(samples)
    raise ValueError(f"kind={kind!r}")


def identity_sandwich(f: Tensor) -> Tensor:
    """``V = I`` (the NTK): rows are the per-sample Jacobians."""
    return torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)


# ----------------------------------------------------------------------------- functional engine
def functional_rows(fm: FunctionalModel, names: list[str], X: Tensor, V: Tensor) -> dict[str, Tensor]:
    """Per-sample factor rows ``G_bk = V_bkᵀ J_b`` for parameters ``names``: dict of ``(B, K, *shape)``.

    ``vmap`` over samples of a ``vjp`` that is itself ``vmap``-ed over the K sandwich columns.
    """
    fixed = {n: fm.params[n] for n in fm.names if n not in names}
    free = {n: fm.params[n] for n in names}

    def one(x: Tensor, v: Tensor) -> dict[str, Tensor]:
        _, pull = vjp(lambda q: fm({**fixed, **q}, x[None])[0], free)
        return vmap(lambda c: pull(c)[0], in_dims=1)(v)

    return vmap(one)(X, V)


# ----------------------------------------------------------------------------- layerwise engine
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class _Call:
    module: nn.Module
    a: Tensor  # layer input (B, ...)
    tap: Tensor  # zero tensor added to the output; its gradient is the output gradient


def _conv_patches(m: nn.Module, a: Tensor) -> Tensor:
    """Unfolded input patches ``(B, I·k…, L)`` of a Conv1d/Conv2d call, matching its padding mode."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
    if isinstance(m, nn.Conv1d):
        a = a[:, :, None, :]
        ks, dil, st = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
    else:
        ks, dil, st = m.kernel_size, m.dilation, m.stride
    return F.unfold(a, ks, dilation=dil, padding=0, stride=st)


def _call_rows(c: _Call, g: Tensor, which: str) -> Tensor:
    """Per-sample rows ``(K, B, numel)`` of ``which`` ∈ {weight, bias} from one call; ``g (K, B, ...)``."""
    m, a = c.module, c.a
    K, B = g.shape[:2]
    if isinstance(m, nn.Linear):
        if which == "bias":
            return g.reshape(K, B, -1, g.shape[-1]).sum(2)
        gr, ar = g.reshape(K, B, -1, g.shape[-1]), a.reshape(B, -1, a.shape[-1])
        return torch.einsum("kbto,bti->kboi", gr, ar).reshape(K, B, -1)
    gr = g.reshape(K, B, g.shape[2], -1)  # (K, B, O, L)
    if which == "bias":
        return gr.sum(-1)
    patches = _conv_patches(m, a)  # (B, I·k, L)
    G = m.groups
    gg = gr.reshape(K, B, G, -1, gr.shape[-1])
    pp = patches.reshape(B, G, -1, patches.shape[-1])
    return torch.einsum("kbgol,bgil->kbgoi", gg, pp).reshape(K, B, -1)


def _simple(calls: list[_Call], which: str) -> bool:
    """One call of a Linear layer on a ``(B, I)`` input: diag/Gram need no materialised rows."""
    return len(calls) == 1 and isinstance(calls[0].module, nn.Linear) and calls[0].a.dim() == 2


@dataclass
class _Plan:
    """Which selected parameters the layerwise engine owns: name -> (attribute, [modules])."""

    owned: dict[str, tuple[str, list[nn.Module]]] = field(default_factory=dict)
    verified: set = field(default_factory=set)  # (input shape, dtype) signatures already checked
    out_dim: dict = field(default_factory=dict)  # (input shape, dtype) -> C


#: model -> {(name, id(tensor)) selection: plan}; the verification result lives as long as the model.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(fm: FunctionalModel) -> _Plan:
    """The cached plan for this model and parameter selection (module structure walked once)."""
    key = tuple((n, id(t)) for n, t in fm.tensors.items())
    plans = _PLANS.setdefault(fm.model, {})
    if key not in plans:
        plans[key] = _make_plan(fm)
    return plans[key]


def _make_plan(fm: FunctionalModel) -> _Plan:
    ids = {id(t): n for n, t in fm.tensors.items()}
    owners: dict[str, tuple[str, list]] = {}
    foreign: set[str] = set()
    for m in fm.model.modules():
        for attr, t in m._parameters.items():
            if t is None or id(t) not in ids:
                continue
            n = ids[id(t)]
            if isinstance(m, _LAYERS) and attr in ("weight", "bias"):
                prev = owners.setdefault(n, (attr, []))
                if prev[0] != attr:
                    foreign.add(n)
                prev[1].append(m)
            else:
                foreign.add(n)
    return _Plan({n: v for n, v in owners.items() if n not in foreign})


class _Recorder:
    """Forward hooks on the owning layers: record inputs, add a zero tap to outputs."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.calls: list[_Call] = []
        self.handles = [m.register_forward_hook(self._hook) for m in set(modules)]

    def _hook(self, m, inputs, out):
        tap = torch.zeros_like(out, requires_grad=True)
        self.calls.append(_Call(m, inputs[0].detach(), tap))
        return out + tap

    def close(self):
        for h in self.handles:
            h.remove()


class Stats:
    """Per-batch statistics of the factor rows, only those requested.

    * ``diag``:   ``dict[name, Σ_{b,k} G_bk² (shape of the parameter)]``
    * ``diagk``:  ``dict[name, (K, *shape)]``, the same per sandwich column ``Σ_b G_bk²``
    * ``sqnorm``: ``dict[name, (B, K)]`` per-sample, per-column ``‖G_bk‖²`` over that parameter
    * ``gram``:   ``(B, K, K)`` per-sample ``G_b G_bᵀ`` summed over the selected parameters
    * ``rows``:   ``dict[name, (B, K, numel)]``
    """

    def __init__(self):
        self.diag: dict[str, Tensor] = {}
        self.diagk: dict[str, Tensor] = {}
        self.sqnorm: dict[str, Tensor] = {}
        self.gram: Tensor | None = None
        self.rows: dict[str, Tensor] = {}

    def add_rows(self, n: str, r: Tensor, want: set[str], shape) -> None:
        """Record the statistics of materialised rows ``r (B, K, numel)`` of parameter ``n``."""
        if "diag" in want:
            self.diag[n] = (r**2).sum((0, 1)).reshape(shape)
        if "diagk" in want:
            self.diagk[n] = (r**2).sum(0).reshape(r.shape[1], *shape)
        if "sqnorm" in want:
            self.sqnorm[n] = (r**2).sum(-1)
        if "gram" in want:
            self.add_gram(torch.einsum("bkp,blp->bkl", r, r))
        if "rows" in want:
            self.rows[n] = r

    def add_gram(self, gm: Tensor):
        self.gram = gm if self.gram is None else self.gram + gm


def batch_stats(
    fm: FunctionalModel,
    X: Tensor,
    make_v,
    want: set[str],
    engine: str = "auto",
) -> tuple[Tensor, Tensor, Stats]:
    """Forward ``X``, build ``V = make_v(f)``; return ``(f, V, stats)``.

    ``want`` ⊆ {diag, diagk, sqnorm, gram, rows} names the :class:`Stats` to compute.
    """
    check_choice("engine", engine, ENGINES)
    plan = _plan(fm) if engine != "functional" else _Plan()
    owned = plan.owned
    if owned and (tuple(X.shape[1:]), X.dtype) not in plan.verified:
        _verify(fm, plan, X)
        plan.verified.add((tuple(X.shape[1:]), X.dtype))
    if engine == "layerwise" and len(owned) < len(fm.names):
        missing = [n for n in fm.names if n not in owned]
        raise ValueError(
            f"engine='layerwise' handles only parameters of Linear/Conv1d/Conv2d layers used through them; "
            f"not {missing}. Use engine='auto'."
        )
    stats = Stats()
    if not owned:
        with torch.no_grad():
            f = forward_checked(fm, fm.params, X)
        V = make_v(f)
    else:
        rec = _Recorder(m for _, mods in owned.values() for m in mods)
        try:
            with torch.enable_grad():
                f = forward_checked(fm, fm.params, X)
        finally:
            rec.close()
        V = make_v(f.detach())
        _layerwise(fm, owned, rec.calls, f, V, want, stats)
    rest = [n for n in fm.names if n not in owned]
    if rest:
        rows = functional_rows(fm, rest, X, V)
        for n in rest:
            stats.add_rows(n, rows[n].reshape(*V.shape[::2], -1), want, fm.shapes[n])
    return f.detach(), V, stats


def output_dim(fm: FunctionalModel, X: Tensor) -> int:
    """C for inputs like ``X``: one forward of one sample, remembered per model and input shape."""
    cache = _plan(fm).out_dim
    key = (tuple(X.shape[1:]), X.dtype)
    if key not in cache:
        with torch.no_grad():
            cache[key] = forward_checked(fm, fm.params, X[:1]).shape[-1]
    return cache[key]


def rows_numel(fm: FunctionalModel, want: set[str], engine: str) -> int:
    """Parameters whose rows get materialised: all for ``rows``/functional, else all but single-use Linear."""
    if "rows" in want or engine == "functional":
        return fm.P
    simple = sum(fm.sizes[n] for n, (_, mods) in _plan(fm).owned.items() if len(mods) == 1)
    return max(1, fm.P - simple)


def stream(
    fm: FunctionalModel, data, make_v, want: set[str], *, need_y: bool, columns,
    batch_size: int | None = None, engine: str = "auto",
) -> Iterator[tuple[int, Tensor, Tensor, Stats]]:
    """Stream ``data`` and yield ``(n, f, V, stats)`` per chunk, ``V = make_v(f, Y)`` with
    ``columns(C)`` columns per sample.  Batches are split so that materialised rows fit
    :data:`WORK_BUDGET`; nothing is accumulated across chunks."""
    numel = rows_numel(fm, want, engine)
    item = fm.itemsize
    k = None
    for X, Y in iter_batches(data, fm, need_y=need_y, batch_size=batch_size):
        if k is None:
            k = columns(output_dim(fm, X))
        step = max(1, WORK_BUDGET // max(1, k * numel * item))
        for i in range(0, len(X), step):
            Xc, Yc = X[i : i + step], None if Y is None else Y[i : i + step]
            f, V, st = batch_stats(fm, Xc, lambda f, Yc=Yc: make_v(f, Yc), want, engine)
            yield len(Xc), f, V, st


class Run:
    """Validated arguments shared by every Fisher reduction, and the chunk stream they drive."""

    def __init__(self, model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine):
        check_kind(likelihood, kind)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("engine", engine, ENGINES)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be a positive integer (label draws per input), got {samples!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        self.fm = FunctionalModel(model, params)
        self.data, self.lik, self.kind = data, likelihood, kind
        self.reduction, self.samples, self.generator = reduction, samples, generator
        self.batch_size, self.engine = batch_size, engine
        self.n = 0

    def batches(self):
        """Yield ``(X, Y)`` batches of the data, counting this pass's samples in ``self.n``."""
        self.n = 0
        for X, Y in iter_batches(self.data, self.fm, need_y=self.kind == "empirical", batch_size=self.batch_size):
            self.n += len(X)
            yield X, Y

    def v(self, f, y):
        """The kind's sandwich ``V (B, C, K)``; labels ``y`` are used only by ``kind="empirical"``."""
        return sandwich(self.lik, self.kind, f, y, self.samples, self.generator)

    def columns(self, C: int) -> int:
        """K, the sandwich's columns per sample, for a model with C outputs."""
        return {"mc": self.samples, "empirical": 1}.get(self.kind, C)

    def chunks(self, want: set[str], make_v=None, columns=None):
        """Yield ``(f, V, stats)`` per chunk of the data (see :func:`fisherlens._core.stream`);
        ``make_v``/``columns`` replace the kind's sandwich and its column count.  Counts this pass's samples
        in ``self.n``."""
        self.n = 0
        for n, f, V, st in stream(
            self.fm, self.data, make_v or self.v, want, need_y=self.kind == "empirical",
            columns=columns or self.columns, batch_size=self.batch_size, engine=self.engine,
        ):
            self.n += n
            yield f, V, st

    def scale(self) -> float:
        return 1.0 / self.n if self.reduction == "mean" else 1.0


def _tap_grads(calls: list[_Call], f: Tensor, V: Tensor) -> list[Tensor]:
    """Output gradients of every recorded call for each sandwich column: ``(K, B, ...)`` each."""
    K = V.shape[-1]
    cot = V.permute(2, 0, 1)  # (K, B, C)
    taps = [c.tap for c in calls]
    if not taps or not f.requires_grad:
        gs = [None] * len(taps)
    elif K == 1:
        gs = torch.autograd.grad(f, taps, cot[0], allow_unused=True)
        gs = [None if g is None else g[None] for g in gs]
    else:
        gs = torch.autograd.grad(f, taps, cot, allow_unused=True, is_grads_batched=True)
    return [torch.zeros(K, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(gs, taps, strict=True)]


def _layerwise(fm, owned, calls, f, V, want, stats: Stats) -> None:
    grads = _tap_grads(calls, f, V)
    by_module: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(id(c.module), []).append(i)
    for n, (which, mods) in owned.items():
        idx = [i for m in mods for i in by_module.get(id(m), [])]
        if not idx:  # parameter unused in this forward: its rows are zero
            z = torch.zeros(V.shape[0], V.shape[-1], fm.sizes[n], dtype=f.dtype, device=f.device)
            stats.add_rows(n, z, want, fm.shapes[n])
            continue
        sub = [calls[i] for i in idx]
        if _simple(sub, which) and "rows" not in want:
            g = grads[idx[0]]  # (K, B, O)
            a2 = sub[0].a.square()  # (B, I)
            if "diag" in want:
                g2 = g.square().sum(0)  # (B, O)
                stats.diag[n] = g2.sum(0) if which == "bias" else g2.T @ a2
            if "diagk" in want:
                stats.diagk[n] = g.square().sum(1) if which == "bias" else torch.einsum("kbo,bi->koi", g.square(), a2)
            if "sqnorm" in want:
                s = g.square().sum(-1).T  # (B, K)
                stats.sqnorm[n] = s if which == "bias" else s * a2.sum(-1)[:, None]
            if "gram" in want:
                gg = torch.einsum("kbo,lbo->bkl", g, g)
                stats.add_gram(gg if which == "bias" else gg * a2.sum(-1)[:, None, None])
            continue
        r = sum(_call_rows(c, grads[i], which) for c, i in zip(sub, idx, strict=True)).transpose(0, 1)  # (B, K, numel)
        stats.add_rows(n, r, want, fm.shapes[n])


def _verify(fm: FunctionalModel, plan: _Plan, X: Tensor) -> None:
    """Check the layerwise attribution once per signature: Σ_b rows must equal autograd's gradient.

    A parameter also used outside its layer (or on inputs whose first dimension is not the batch) fails
    and is handed to the functional engine, with a warning.
    """
    owned = plan.owned
    X = X[: min(len(X), 4)]
    p = {n: t.clone().requires_grad_(n in owned) for n, t in fm.params.items()}
    rec = _Recorder(m for _, mods in owned.values() for m in mods)
    try:
        with torch.enable_grad():
            f = forward_checked(fm, p, X)
    finally:
        rec.close()
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
    names = list(owned)
    with torch.enable_grad():
        true = torch.autograd.grad((f * w).sum(), [p[n] for n in names], retain_graph=True, allow_unused=True)
    V = w[:, :, None]
    grads = _tap_grads(rec.calls, f, V)
    bad = []
    for n, t in zip(names, true, strict=True):
        which, mods = owned[n]
        ids = {id(m) for m in mods}
        idx = [i for i, c in enumerate(rec.calls) if id(c.module) in ids]
        ok = all(rec.calls[i].a.shape[0] == len(X) for i in idx)
        if ok:
            est = sum((_call_rows(rec.calls[i], grads[i], which) for i in idx), torch.zeros(1, dtype=f.dtype))
            est = est.sum((0, 1)) if idx else torch.zeros(fm.sizes[n], dtype=f.dtype, device=f.device)
            ref = torch.zeros(fm.sizes[n], dtype=f.dtype, device=f.device) if t is None else t.reshape(-1)
            tol = 1e-4 if f.dtype != torch.float64 else 1e-9
            ok = torch.allclose(est, ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1e-30))
        if not ok:
            bad.append(n)
    for n in bad:
        del owned[n]
    if bad:
        warnings.warn(
            f"Parameters {bad} are used outside the layer that owns them; fisherlens uses the slower "
            "general (torch.func) engine for them.",
            stacklevel=3,
        )
