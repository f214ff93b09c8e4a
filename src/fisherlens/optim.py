"""Optimizers: natural-gradient descent with the exact damped Fisher solve of :func:`fisherlens.natural_gradient`.

One step on a batch ``(X, Y)``, with ``λ`` the damping, ``μ`` a group's momentum and ``η`` its learning rate:

    d = (F + λI)⁻¹ g,      b ← μ b + d   (b = d on the first step),      θ ← θ − η b,

F the Fisher of the batch (``kind``) over *all* parameters being updated (one joint solve across the param
groups, so that their coupling in F is kept), g their gradient.  Levenberg–Marquardt damping (Martens 2010,
*Deep learning via Hessian-free optimization*, §4.1) compares the loss reduction on the batch with the one the
quadratic model predicts, ``ρ = (L(θ) − L(θ + Δ)) / −(gᵀΔ + ½ ΔᵀFΔ)`` (``Δ`` the step taken, F undamped), and
sets ``λ ← 3λ/2`` if ``ρ < 1/4``, ``λ ← 2λ/3`` if ``ρ > 3/4`` (the step is kept either way).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ._core import Request, quadratic_sum, unwrap_model
from .natural import SOLVERS, NaturalDirection, data_loss, natural_gradient
from .spectrum import critical_learning_rate, eigenvalues

Tensor = torch.Tensor

__all__ = ["NaturalGradient"]

#: adaptive damping never goes below this (a λ of round-off size would make the solve singular)
MIN_DAMPING = 1e-10


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent, ``θ ← θ − η (F + λI)⁻¹ g`` (with heavy-ball momentum on the direction).

    The batch reaches the optimizer explicitly: ``opt.step(batch)``, ``batch`` an ``(X, Y)`` pair of tensors or a
    dict batch (``input_ids``, ``attention_mask``, ``labels``; the ``data`` forms of
    :func:`fisherlens.natural_gradient` all work, but one batch is what a step is for).  F is computed on that
    batch at the current parameters.

    **Which gradient.**  If at least one parameter of the groups has a ``.grad`` (the caller ran
    ``loss.backward()``), g is the ``.grad`` as the caller left it — so gradient clipping
    (``torch.nn.utils.clip_grad_norm_``) or any other edit of ``.grad`` before ``step`` acts on g; parameters
    whose ``.grad`` is ``None`` are left out of the solve and not updated, as in torch's optimizers.  The loss
    behind ``.grad`` must be normalised like F (``reduction``): for ``reduction="mean"`` the mean over the inputs
    of each input's loss (``cross_entropy(..., reduction="mean")`` on ``(B, C)`` logits); for a language model's
    token-averaged loss pass ``reduction="per_prediction"``.  If no parameter has a ``.grad``, g is computed from
    the batch (the gradient of the likelihood's loss with that normalisation, one forward and backward; ``.grad``
    is left untouched).  Call ``zero_grad()`` between steps as usual, or a stale ``.grad`` is used again.

    **AMP.**  Keep float32 parameters (the master weights): the Fisher, the solve and the update run in the
    parameters' dtype with autocast switched off inside ``step`` (a float16 forward would make F inexact).  A
    ``torch.amp.GradScaler`` is not supported beyond its generic path: call ``scaler.unscale_(opt)`` before
    ``opt.step(batch)`` (or ``scaler.step(opt, batch)``, which unscales and skips steps whose ``.grad`` has inf);
    the Fisher itself needs no scaling.

    Args:
        params: parameters or param groups (dicts with ``params`` and optionally ``lr``, ``momentum``), all
            parameters of ``model``.
        model: the module whose parameters these are.
        likelihood: the output model (``fl.Categorical()``, ``fl.Gaussian(σ)``, ...).
        lr: η > 0, or ``"critical"``: ``critical_fraction`` times the critical learning rate of the natural-gradient
            step on the batch's quadratic model, ``η_c = 2 (1 + μ) / κ`` with ``κ = λ_max / (λ_max + λ)`` the largest
            eigenvalue of ``(F + λI)⁻¹ F`` (λ_max of F from ``fl.eigenvalues(..., k=1, method="lanczos")``, every
            step; :func:`fisherlens.critical_learning_rate`).  κ ≤ 1, so η_c ≥ 2(1 + μ).
        damping: λ > 0 (the initial λ with ``adaptive_damping``).  One λ for all groups (one joint solve).
        momentum: μ in [0, 1).
        kind, solver, reduction, samples, generator, output, batch_size, tol, max_iter, max_memory: as in
            :func:`fisherlens.natural_gradient`.
        adaptive_damping: adapt λ by the reduction ratio ρ after every step (never below :data:`MIN_DAMPING`);
            costs one Fisher quadratic form (one ``jvp`` pass) and one forward (two with a caller's ``.grad``).
        critical_fraction: the fraction of η_c used by ``lr="critical"`` (1 is the edge of stability).
        group, distributed: as in :func:`fisherlens.fisher_matrix`: under a process group ``batch`` is this rank's
            shard of the step's batch and every rank takes the same step, that of the union (docs/distributed.md);
            a ``DistributedDataParallel`` model is the module it wraps.

    Attributes:
        damping: the current λ (saved by :meth:`state_dict`).
        last: what the last step did: ``direction`` (the :class:`~fisherlens.natural.NaturalDirection`, with its
            ``residual``, ``iterations`` and ``converged``), ``lr`` (per group), ``damping`` (the λ used),
            ``rho`` and ``loss_before`` / ``loss_after`` (with ``adaptive_damping``), ``lambda_max`` (``"critical"``).
    """

    def __init__(self, params, model: torch.nn.Module, likelihood, lr=0.1, damping: float = 1e-3,
                 momentum: float = 0.0, kind: str = "true", solver: str = "auto", adaptive_damping: bool = False, *,
                 reduction: str = "mean", samples: int = 1, generator=None, output=None, batch_size=None,
                 tol: float | None = None, max_iter: int | None = None, max_memory: int | None = None,
                 critical_fraction: float = 0.5, group=None, distributed: bool | None = None):
        _check_lr(lr)
        _check_momentum(momentum)
        if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0
                and math.isfinite(damping)):
            raise ValueError(f"damping must be a positive finite number, got {damping!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        if not 0 < critical_fraction <= 1:
            raise ValueError(f"critical_fraction must lie in (0, 1], got {critical_fraction!r}.")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.model, self.likelihood = model, likelihood
        self._names = {id(p): n for n, p in unwrap_model(model).named_parameters()}  # a DDP model: its module's
        for pg in self.param_groups:
            _check_lr(pg["lr"])
            _check_momentum(pg["momentum"])
            if any(id(p) not in self._names for p in pg["params"]):
                raise ValueError("NaturalGradient optimises parameters of `model` only: a parameter in params is not "
                                 "in model.named_parameters().")
        self.damping = float(damping)
        self.kind, self.solver, self.adaptive_damping = kind, solver, bool(adaptive_damping)
        self.critical_fraction = float(critical_fraction)
        self.options = {"reduction": reduction, "samples": samples, "generator": generator, "output": output,
                        "batch_size": batch_size, "group": group, "distributed": distributed}
        self.solve_options = {"tol": tol, "max_iter": max_iter, "max_memory": max_memory}
        self.last: dict = {}

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """torch's optimizer state (momentum buffers, param groups) plus ``"natural": {"damping": λ}``."""
        sd = super().state_dict()
        sd["natural"] = {"damping": self.damping}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        natural = sd.pop("natural", None)
        super().load_state_dict(sd)
        if natural is not None:
            self.damping = float(natural["damping"])

    # ------------------------------------------------------------------------- the step
    def step(self, batch=None, closure=None):
        """One natural-gradient step on ``batch`` (see the class docstring for which gradient is used).

        Args:
            batch: ``(X, Y)`` or a dict batch; required.
            closure: optional; called (with grad enabled) before the step, e.g. to recompute ``.grad``.

        Returns:
            The closure's loss if given, else the batch loss before the step when it was computed, else ``None``.
        """
        if batch is None:
            raise TypeError("NaturalGradient.step needs the batch the Fisher is computed on: opt.step((X, Y)) or "
                            "opt.step(dict_batch).")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        chosen = [p for p in params if p.grad is not None] or [p for p in params if p.requires_grad]
        if not chosen:
            return loss
        self.last = {"damping": self.damping}
        with _no_autocast(chosen[0]):
            d = self._direction(batch, chosen)
            lrs = [self._lr(g, batch, chosen) for g in self.param_groups]
            delta = self._delta(d, lrs, {id(p) for p in chosen})
            rho_terms = self._predicted(batch, chosen, d, delta) if self.adaptive_damping else None
            with torch.no_grad():
                for p, dp in delta.values():
                    p.add_(dp)
            if rho_terms is not None:
                self._adapt(batch, chosen, *rho_terms)
        self.last.update(direction=d, lr=lrs)
        return loss if loss is not None else d.loss

    def _direction(self, batch, chosen: list[Tensor]) -> NaturalDirection:
        with_grad = all(p.grad is not None for p in chosen)
        grad = {self._names[id(p)]: p.grad for p in chosen} if with_grad else None
        return natural_gradient(self.model, batch, self.likelihood, grad, self.damping, self.kind,
                                params=chosen, solver=self.solver, **self.options, **self.solve_options)

    def _lr(self, group: dict, batch, chosen: list[Tensor]) -> float:
        if group["lr"] != "critical":
            return float(group["lr"])
        if "lambda_max" not in self.last:
            o = self.options
            self.last["lambda_max"] = float(eigenvalues(
                self.model, batch, self.likelihood, k=1, method="lanczos", kind=self.kind, params=chosen,
                reduction=o["reduction"], samples=o["samples"], generator=o["generator"],
                batch_size=o["batch_size"], output=o["output"], group=o["group"], distributed=o["distributed"])[0])
        lam_max = self.last["lambda_max"]
        kappa = lam_max / (lam_max + self.damping)
        return self.critical_fraction * critical_learning_rate(kappa, group["momentum"])

    def _delta(self, d: NaturalDirection, lrs: list[float], chosen: set[int]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (p, Δ_p)}``, ``Δ = −η b`` with the momentum buffer ``b ← μ b + d`` (kept in the state)."""
        out = {}
        for group, lr in zip(self.param_groups, lrs, strict=True):
            for p in group["params"]:
                if id(p) not in chosen:
                    continue
                name = self._names[id(p)]
                step = d[name].to(p.dtype)
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    buf = step.clone() if buf is None else buf.mul_(group["momentum"]).add_(step)
                    state["momentum_buffer"] = buf
                    step = buf
                out[name] = (p, -lr * step)
        return out

    # ------------------------------------------------------------------------- adaptive damping
    def _request(self, batch, chosen: list[Tensor]) -> Request:
        o = self.options
        return Request(model=self.model, data=batch, likelihood=self.likelihood, kind=self.kind, params=chosen,
                       reduction=o["reduction"], samples=o["samples"], generator=o["generator"],
                       batch_size=o["batch_size"], output=o["output"], group=o["group"], distributed=o["distributed"])

    def _predicted(self, batch, chosen, d: NaturalDirection, delta) -> tuple[float, float]:
        """``(L(θ), predicted reduction −(gᵀΔ + ½ ΔᵀFΔ))`` at the current θ, before the update."""
        run = self._request(batch, chosen)
        fm = run.fm
        step = {n: delta[n][1].to(fm.dtype) for n in fm.names}
        total, _ = quadratic_sum(fm, run.batches(check=False), run.counted(run.sandwich), step)
        (total,) = run.total([total])  # under a process group: the union of the ranks' batches
        quad = total * run.scale()
        lin = float(sum((d.grad[n].double() * step[n].double()).sum() for n in fm.names))
        before = d.loss if d.loss is not None else data_loss(run, run.batches(check=False), grad=False)[0]
        return before, -(lin + 0.5 * quad)

    def _adapt(self, batch, chosen, before: float, predicted: float) -> None:
        """ρ from the loss after the update; λ ← 3λ/2 if ρ < 1/4, 2λ/3 if ρ > 3/4."""
        run = self._request(batch, chosen)
        after = data_loss(run, run.batches(check=False), grad=False)[0]
        rho = (before - after) / predicted if predicted > 0 else -math.inf
        if rho < 0.25:
            self.damping *= 1.5
        elif rho > 0.75:
            self.damping = max(self.damping * 2.0 / 3.0, MIN_DAMPING)
        self.last.update(rho=rho, loss_before=before, loss_after=after)


def _check_lr(lr) -> None:
    if lr == "critical":
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number or 'critical', got {lr!r}.")


def _check_momentum(momentum) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}.")


def _no_autocast(p: Tensor):
    """Autocast off for the Fisher passes (a no-op outside autocast)."""
    kind = p.device.type
    return torch.autocast(device_type=kind, enabled=False) if torch.is_autocast_enabled(kind) else nullcontext()
