"""Pruning by Fisher saliency (Optimal Brain Damage) or by magnitude, on torch's own pruning reparametrisation.

The **saliency** of one entry ``θ_i`` of a selected parameter tensor is what removing it (``θ_i → 0``) costs:

    s_i = ½ F_ii θ_i²        criterion="fisher"     (Optimal Brain Damage with the Fisher diagonal)
    s_i = |θ_i|              criterion="magnitude"  (the baseline)
    s_i = θ_i²               criterion="squared"    (the same ranking as "magnitude")

Why ``½ F_ii θ_i²``: Optimal Brain Damage (LeCun, Denker & Solla, "Optimal Brain Damage", 1990) expands the loss
to second order about a trained θ, drops the gradient (zero at a minimum) and the off-diagonal curvature, and so
charges ``½ H_ii θ_i²`` for zeroing ``θ_i``.  With the Fisher in place of the Hessian (its Gauss–Newton part,
docs/conventions.md#fisher-information) the true-Fisher saliency is exactly the second-order KL divergence between
the model's predictions before and after zeroing the entry alone,
``KL(p_θ ‖ p_{θ − θ_i e_i}) ≈ ½ F_ii θ_i²`` (docs/conventions.md#kl-self-test).  ``F_ii`` is
:func:`fisherlens.fisher_blocks` ``(what="diag")``: ``kind="true"``, ``"empirical"`` (``(1/N) Σ_n g_ni²``, needs
labels) or ``"mc"``, computed exactly or estimated with ``method="hutchinson"``/``"mc"`` and ``samples=`` draws
(docs/conventions.md#hutchinson-estimator), in which case the saliencies are :class:`fisherlens.Estimate` values.

**Masks** (``True`` = keep) prune exactly ``round(sparsity · n)`` entries of smallest saliency per scope: over all
selected entries together (``scope="global"``, ``n`` = all selected entries) or per tensor (``scope="layer"``).
``round`` is Python's (half to even), as in ``torch.nn.utils.prune``.  Ties are broken by position: the tensor
first in the saliency dict, then the lower flat (row-major) index, is pruned first.

:func:`apply` installs masks with ``torch.nn.utils.prune.custom_from_mask``, so the model gets the standard
``weight_orig`` parameter, ``weight_mask`` buffer and forward pre-hook ``weight = weight_orig * weight_mask``
(``remove=True`` makes it permanent: a plain ``weight`` parameter with the pruned entries zero).  A tensor pruned
before is seen through its mask everywhere here: its name stays ``"….weight"``, its saliency is that of the
effective weight (zero at pruned entries, so ``sparsity`` counts them) and new masks combine with the old one.

Parameters (``params=``): names, module prefixes or tensors as everywhere (docs/conventions.md#parameters-and-blocks);
by default every parameter whose name ends in ``"weight"`` and that has at least two dimensions (the weights of
``Linear``, ``Conv*``, ``Embedding``, attention projections), so biases and normalisation scales are left alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ._core import check_choice, select_params
from .fisher import fisher_blocks
from .results import Estimate

Tensor = torch.Tensor

__all__ = ["saliency", "masks", "apply", "prune", "CRITERIA", "SCOPES"]

CRITERIA = ("fisher", "magnitude", "squared")
SCOPES = ("global", "layer")


# ----------------------------------------------------------------------------- which tensors
@dataclass(frozen=True)
class _Target:
    """One prunable tensor: ``module.attr`` is what the forward uses; ``param`` its name in ``named_parameters()``
    (``"….weight_orig"`` once torch has pruned it, with ``mask`` its ``weight_mask``)."""

    module: nn.Module
    attr: str
    param: str
    tensor: Tensor
    mask: Tensor | None


def _pruned(module: nn.Module, attr: str) -> bool:
    """Whether ``module.attr`` is reparametrised by ``torch.nn.utils.prune``."""
    return any(isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == attr
               for h in module._forward_pre_hooks.values())


def _targets(model: nn.Module) -> dict[str, _Target]:
    """Every parameter tensor of ``model`` by the name of the tensor the forward uses, in ``named_parameters()``
    order (a pruned ``"0.weight_orig"`` appears as ``"0.weight"``)."""
    out = {}
    for pname, p in model.named_parameters():
        prefix, _, attr = pname.rpartition(".")
        module = model.get_submodule(prefix)
        base = attr.removesuffix("_orig")
        if base != attr and _pruned(module, base):
            mask = getattr(module, base + "_mask")
            out[f"{prefix}.{base}" if prefix else base] = _Target(module, base, pname, p, mask)
        else:
            out[pname] = _Target(module, attr, pname, p, None)
    return out


def _select(model: nn.Module, params) -> dict[str, _Target]:
    """The selected tensors (default: names ending in ``"weight"`` with ``dim ≥ 2`` that require grad)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    targets = _targets(model)
    if params is None:
        chosen = [n for n, t in targets.items() if n.endswith("weight") and t.tensor.dim() >= 2
                  and t.tensor.requires_grad]
        if not chosen:
            raise ValueError("The model has no weight matrix or kernel to prune (no parameter named '…weight' with "
                             "at least two dimensions that requires grad); pass params= to choose tensors.")
    else:
        chosen = select_params({n: t.tensor for n, t in targets.items()}, params)
    return {n: targets[n] for n in chosen}


# ----------------------------------------------------------------------------- saliency
def _scaled(diag, theta2: Tensor):
    """``½ F_ii θ_i²`` from a Fisher diagonal (a tensor or an :class:`Estimate` of one)."""
    if isinstance(diag, Estimate):
        return Estimate(0.5 * diag.value * theta2, 0.5 * diag.stderr * theta2, diag.samples)
    return 0.5 * diag * theta2


def saliency(
    model: nn.Module, data=None, likelihood=None, criterion: str = "fisher", kind: str = "true",
    method: str = "exact", *, samples: int = 1, params=None, output=None, generator: torch.Generator | None = None,
    reduction: str = "mean", batch_size: int | None = None, engine: str = "auto", probe: str = "rademacher",
) -> dict[str, Tensor | Estimate]:
    """Per-entry saliency ``{name: (*shape)}`` of the selected parameter tensors.

    ``criterion="fisher"``: ``s_i = ½ F_ii θ_i²`` (Optimal Brain Damage; for the true Fisher, the second-order
    ``KL(p_θ ‖ p_{θ − θ_i e_i})`` of zeroing entry i alone); ``"magnitude"``: ``|θ_i|``; ``"squared"``: ``θ_i²``.
    A tensor already pruned by ``torch.nn.utils.prune`` is measured at its effective value
    ``weight_orig ⊙ weight_mask`` (saliency 0 at the pruned entries).

    Args:
        model: any ``torch.nn.Module`` (BatchNorm/Dropout in eval mode for ``criterion="fisher"``).
        data: as in :func:`fisherlens.fisher_matrix`; needed for ``"fisher"`` only (with labels for
            ``kind="empirical"``).
        likelihood: the output model (``fl.Categorical()``, ``fl.Gaussian(sigma)``, …); ``"fisher"`` only.
        criterion: ``"fisher"``, ``"magnitude"`` or ``"squared"``.
        kind: ``"true"``, ``"empirical"`` or ``"mc"`` (which Fisher).
        method: ``"exact"``, or ``"hutchinson"`` / ``"mc"``: random estimates of the true Fisher's diagonal
            (``kind="true"``) with ``samples`` draws.
        samples: draws of the estimator (or sampled labels per input for ``kind="mc"``).
        params: names, module prefixes or tensors; default the parameters whose name ends in ``"weight"``
            with at least two dimensions (Linear/Conv/Embedding weights; no biases).
        output, generator, reduction, batch_size, engine, probe: as in :func:`fisherlens.fisher_blocks`
            (``reduction`` only rescales the Fisher, so it leaves every mask unchanged).

    Returns:
        ``{name: Tensor}`` in ``named_parameters()`` order, detached, shaped like each tensor (a pruned tensor under
        its forward name ``"….weight"``); for a random ``method`` the ``"fisher"`` values are
        :class:`fisherlens.Estimate` s (``value`` and ``stderr`` both scaled by ``½ θ_i²``).
    """
    check_choice("criterion", criterion, CRITERIA)
    chosen = _select(model, params)
    theta = {n: _effective(t) for n, t in chosen.items()}
    if criterion == "magnitude":
        return {n: v.abs() for n, v in theta.items()}
    if criterion == "squared":
        return {n: v.square() for n, v in theta.items()}
    if data is None or likelihood is None:
        raise ValueError("criterion='fisher' needs data and a likelihood (the Fisher diagonal); pass them, or use "
                         "criterion='magnitude', which needs neither.")
    diag = fisher_blocks(model, data, likelihood, kind, "diag", method, params=[t.param for t in chosen.values()],
                         reduction=reduction, samples=samples, generator=generator, batch_size=batch_size,
                         engine=engine, probe=probe, output=output)
    return {n: _scaled(diag[t.param], theta[n].square()) for n, t in chosen.items()}


def _effective(t: _Target) -> Tensor:
    """The value the forward uses, detached: ``θ``, or ``θ_orig ⊙ mask`` for a pruned tensor."""
    v = t.tensor.detach()
    return v.clone() if t.mask is None else v * t.mask.to(v.dtype)


# ----------------------------------------------------------------------------- masks
def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a number in [0, 1) (the fraction of entries to prune), "
                        f"got {type(sparsity).__name__}.")
    s = float(sparsity)
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of entries to prune), got {sparsity!r}; "
                         "sparsity=1 would remove every entry.")
    return s


def _values(saliency: Mapping) -> dict[str, Tensor]:
    """The saliency tensors (an :class:`Estimate`'s value), checked: a non-empty dict of finite tensors."""
    if not isinstance(saliency, Mapping) or not saliency:
        raise ValueError("saliency must be a non-empty dict {name: tensor}, as fl.prune.saliency returns.")
    out = {}
    for n, v in saliency.items():
        v = v.value if isinstance(v, Estimate) else v
        if not isinstance(v, Tensor) or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"saliency['{n}'] must be a real tensor, got {type(v).__name__}.")
        v = v.detach()
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"saliency['{n}'] contains NaN or inf, so no ranking exists; check the model and data.")
        out[n] = v
    return out


def _keep(flat: Tensor, sparsity: float) -> Tensor:
    """Keep-mask of a flat saliency: the ``round(sparsity · n)`` smallest entries are False (stable: ties go to the
    lower index)."""
    k = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep


def masks(saliency: Mapping[str, Tensor | Estimate], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Keep-masks ``{name: bool (*shape)}`` (``True`` = keep) pruning the entries of smallest saliency.

    Exactly ``k = round(sparsity · n)`` entries are pruned (Python's ``round``, as ``torch.nn.utils.prune``):

    * ``scope="global"``: over all tensors together, ``n = Σ_l n_l`` — tensors of low saliency lose more;
    * ``scope="layer"``: in every tensor l separately, ``k_l = round(sparsity · n_l)``.

    Ties are broken deterministically: the entry of the tensor earlier in ``saliency``, then of lower flat
    (row-major) index, is pruned first.
    Near ``sparsity = 1`` the rounding can reach ``n`` (``round(0.99 · 70) = 69`` but ``round(0.99 · 7) = 7``): a
    small tensor may then be pruned entirely under ``scope="layer"``.

    Args:
        saliency: ``{name: tensor}`` (or :class:`fisherlens.Estimate` values), e.g. from :func:`saliency`.
        sparsity: the fraction of entries to prune, in ``[0, 1)``.
        scope: ``"global"`` or ``"layer"``.

    Returns:
        ``{name: bool Tensor}`` shaped and placed like each saliency tensor.
    """
    s = _check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    values = _values(saliency)
    if scope == "layer":
        return {n: _keep(v.reshape(-1), s).reshape(v.shape) for n, v in values.items()}
    first = next(iter(values.values()))
    keep = _keep(torch.cat([v.reshape(-1).to(first.device) for v in values.values()]), s)
    parts = keep.split([v.numel() for v in values.values()])
    return {n: m.reshape(v.shape).to(v.device) for (n, v), m in zip(values.items(), parts, strict=True)}


# ----------------------------------------------------------------------------- apply
def _mask_for(name: str, target: _Target, mask) -> Tensor:
    """``mask`` as a bool tensor on the parameter's device, checked against its shape."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"masks['{name}'] must be a tensor, got {type(mask).__name__}.")
    if tuple(mask.shape) != tuple(target.tensor.shape):
        raise ValueError(f"masks['{name}'] has shape {tuple(mask.shape)} but the parameter has shape "
                         f"{tuple(target.tensor.shape)}.")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"masks['{name}'] must be boolean (True = keep) or hold only 0 and 1.")
        mask = mask != 0
    return mask.to(target.tensor.device)


def _target(targets: dict[str, _Target], name) -> _Target:
    """The prunable tensor ``name`` names: a leaf ``nn.Parameter`` registered on a submodule (or one torch has
    pruned before)."""
    if not isinstance(name, str) or name not in targets:
        raise ValueError(
            f"masks names {name!r}, which is not a parameter of a module of this model (a leaf nn.Parameter "
            f"registered on a submodule, such as {next(iter(targets), '0.weight')!r}); buffers, computed or "
            f"parametrised tensors cannot be pruned. Prunable names: {', '.join(targets)}."
        )
    return targets[name]


def apply(model: nn.Module, masks: Mapping[str, Tensor], *, remove: bool = False) -> nn.Module:
    """Prune ``model`` in place with ``masks`` (``True`` = keep) through ``torch.nn.utils.prune.custom_from_mask``.

    Each named tensor ``module.weight`` becomes the standard reparametrisation: a parameter ``weight_orig``, a
    buffer ``weight_mask`` and a forward pre-hook that sets ``weight = weight_orig * weight_mask`` (the pruned
    entries are zero in the forward and get no gradient).  A tensor pruned before keeps its old mask too (torch
    combines them).  All masks are checked before the model is touched.

    Args:
        model: the module to prune (changed in place).
        masks: ``{name: mask}`` with the parameter's shape, boolean (or 0/1), e.g. from :func:`masks`; names are
            those of ``named_parameters()`` (``"….weight"`` also for a tensor torch has already pruned).
        remove: make the pruning permanent with ``torch.nn.utils.prune.remove``: a plain ``weight`` parameter with
            the pruned entries zero, no mask and no hook (torch registers it anew, so it moves behind the
            module's other parameters in ``named_parameters()`` order).

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict {name: bool tensor}, as fl.prune.masks returns.")
    targets = _targets(model)
    plan = []
    for name, mask in masks.items():
        t = _target(targets, name)
        plan.append((t, _mask_for(name, t, mask)))
    for t, m in plan:
        torch_prune.custom_from_mask(t.module, t.attr, m)
        if remove:
            torch_prune.remove(t.module, t.attr)
    return model


# ----------------------------------------------------------------------------- one call
def prune(
    model: nn.Module, data, likelihood, sparsity: float, criterion: str = "fisher", scope: str = "global",
    kind: str = "true", method: str = "exact", *, samples: int = 1, params=None, output=None,
    generator: torch.Generator | None = None, batch_size: int | None = None, engine: str = "auto",
    remove: bool = False,
) -> dict[str, Tensor]:
    """Prune the ``sparsity`` fraction of least salient entries of ``model`` in place; return the masks.

    ``masks(saliency(model, data, likelihood, criterion, kind, method, …), sparsity, scope)`` followed by
    :func:`apply`.  The arguments are checked before any Fisher is computed.

    Args:
        model, data, likelihood, criterion, kind, method, samples, params, output, generator, batch_size, engine: as in
            :func:`saliency` (``data`` and ``likelihood`` may be ``None`` for ``criterion="magnitude"``).
        sparsity: fraction of the selected entries to prune, in ``[0, 1)``.
        scope: ``"global"`` (one ranking over all selected tensors) or ``"layer"`` (the same fraction per tensor).
        remove: make the pruning permanent (see :func:`apply`).

    Returns:
        The applied keep-masks ``{name: bool Tensor}`` (``True`` = keep).
    """
    s = _check_sparsity(sparsity)
    check_choice("criterion", criterion, CRITERIA)
    check_choice("scope", scope, SCOPES)
    sal = saliency(model, data, likelihood, criterion, kind, method, samples=samples, params=params, output=output,
                   generator=generator, batch_size=batch_size, engine=engine)
    keep = masks(sal, s, scope)
    apply(model, keep, remove=remove)
    return keep
