"""The core of fisherlens: one primitive, the per-sample factor rows, and the engines that reduce it.

Every Fisher-type object in fisherlens is a reduction of the per-sample *factor rows*

    G_n = V_nᵀ J_n ∈ R^{K×P},   J_n = ∂f_θ(x_n)/∂θ ∈ R^{M×P},   V_n ∈ R^{M×K},

with ``f_θ(x_n)`` the input's M outputs flattened (``M = C``, or ``T·C`` for outputs at T positions) and the
*sandwich* ``V_n`` chosen by the kind (:meth:`fisherlens.Likelihood.sandwich`; the conventions page
of the documentation defines each): ``S_n`` with ``S_n S_nᵀ = Λ(f_n)`` for the true Fisher (K = C), the loss
gradient at the observed label for the empirical Fisher (K = 1), sampled-label gradients over √k for the MC
Fisher (K = k), ``I`` for the NTK (K = C); so that ``F = (1/N) Σ_n G_nᵀ G_n``.

The internal API, module by module (this package's ``__init__`` is the only import point for the rest of
the library):

* :mod:`.checks` — the only validators: choices, memory refusals, finiteness, outputs;
* :mod:`.model` — :class:`FunctionalModel` and the checked forward / ``vjp`` / ``jvp``;
* :mod:`.fields` — keyword (dict) batches, :class:`Fields`;
* :mod:`.data` — streaming of every accepted form of ``data``;
* :mod:`.distributed` — the data as shards over a ``torch.distributed`` process group (:class:`Shards`, one
  all-reduce per call);
* :mod:`.request` — :class:`Request`, the keyword-only validated arguments, with the one scale rule;
* :mod:`.stats` — :class:`Stats`, the per-batch statistics every view reduces;
* :mod:`.engine` — :func:`batch_stats`, :func:`stream` and the one chunking policy :func:`chunk_size`;
* :mod:`.rows` — :class:`FactorRows`, a data set's factor rows for the Gram routes (spectrum, natural gradient);
* :mod:`.threads` — scipy's BLAS kept to one thread while torch computes (:func:`scipy_blas_one_thread`);
* :mod:`.functional` — the general engine (``torch.func``);
* :mod:`.layerwise` — the fast engine: :mod:`~.layerwise.rules` (one rule per layer type),
  :mod:`~.layerwise.capture` (hooks and output gradients, shared with the Monitor) and
  :mod:`~.layerwise.plan` (ownership and the proof of per-sample attribution).
"""

from .checks import (
    ENGINES,
    KINDS,
    REDUCTIONS,
    all_finite,
    available_memory,
    check_choice,
    check_dense,
    check_inputs,
    check_kind,
    check_outputs,
    check_positive_int,
    close_enough,
    deferred_outputs,
    finite_result,
    renamed,
    tolerance,
)
from .data import iter_batches
from .distributed import Shards, collectives, rank_generator, shards_for, unwrap_model
from .engine import (
    batch_stats,
    checked_grads,
    chunk_size,
    identity_sandwich,
    layer_stats,
    output_dim,
    quadratic_sum,
    stream,
    work_budget,
)
from .fields import Fields, batch_len, describe, split_fields
from .functional import functional_rows
from .layerwise.capture import Capture, WeakHook, tap_grads
from .layerwise.plan import Plan, Signature, ambiguous, call_problems, check_batch, plan_for, route_memo, signature
from .layerwise.rules import RULES, Call, LayerRule, rule_for, ruled_layers
from .model import (
    FunctionalModel,
    differentiable_kernels,
    forward_checked,
    jvp_checked,
    library_forward,
    model_errors,
    pullback_checked,
    pullback_jvp,
    select_params,
    vjp_checked,
)
from .request import Request
from .rows import FactorRows, gram64
from .stats import DiagSum, Stats
from .threads import scipy_blas_one_thread

#: working-memory budget (bytes) for one chunk's working set; results are never chunked away.
WORK_BUDGET = 512 * 2**20

__all__ = [
    "ENGINES", "KINDS", "REDUCTIONS", "WORK_BUDGET", "RULES",
    "all_finite", "available_memory", "check_choice", "check_dense", "check_inputs", "check_kind",
    "check_outputs", "check_positive_int", "close_enough", "deferred_outputs", "finite_result", "renamed", "tolerance",
    "iter_batches", "Shards", "collectives", "rank_generator", "shards_for", "unwrap_model",
    "Fields", "batch_len", "describe", "split_fields",
    "batch_stats", "checked_grads", "chunk_size", "identity_sandwich", "layer_stats",
    "output_dim", "quadratic_sum", "stream", "work_budget", "functional_rows",
    "Capture", "WeakHook", "tap_grads", "Plan", "Signature", "ambiguous", "call_problems", "check_batch", "plan_for",
    "signature", "route_memo", "Call", "LayerRule", "rule_for", "ruled_layers", "FunctionalModel",
    "differentiable_kernels", "forward_checked", "jvp_checked", "library_forward", "pullback_jvp", "model_errors",
    "pullback_checked", "select_params", "vjp_checked", "Request",
    "FactorRows", "gram64", "DiagSum", "Stats", "scipy_blas_one_thread",
]
