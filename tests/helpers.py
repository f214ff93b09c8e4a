"""Small helpers shared by the fisherlens tests: comparisons, error assertions, statistics, file formats, and the
library keyword arguments of the reference-comparison tests of ``test_fisher.py`` / ``test_ntk.py``.

Models and data live in ``zoo.py``, slow reference implementations in ``reference.py``.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import reference as ref
import torch
from scipy.stats import norm
from zoo import ARCHS, LIKS, build, targets


# ----------------------------------------------------------------------------- comparisons and errors
def assert_close(actual, expected, rtol=1e-6, what=""):
    """rtol 1e-6 comparison with an absolute floor tied to the scale of the expected value."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10 * scale + 1e-14,
                               msg=lambda m: f"{what}: {m}")


def raises(exc, match, fn, *args, **kw):
    """``fn(*args, **kw)`` raises ``exc`` with a message matching ``match``."""
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def bonferroni_z(n_entries: int, alpha: float = 1e-3) -> float:
    """Two-sided normal quantile for a family-wise level ``alpha`` over ``n_entries`` comparisons."""
    return float(norm.isf(alpha / (2 * max(n_entries, 1))))


def leading_error(vals: torch.Tensor, ref: torch.Tensor, frac: float = 1e-3) -> float:
    """Largest relative error over the eigenvalues λ ≥ frac·λ_max of the reference (more than 50 of them)."""
    sel = ref >= frac * ref[0]
    assert int(sel.sum()) > 50  # many eigenvalues, not just the top one
    v = vals.double()[: len(ref)]
    return float(((v[sel] - ref[sel]).abs() / ref[sel]).max())


# ----------------------------------------------------------------------------- IDX files
IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise ``arr`` in the IDX format (big-endian header and data)."""
    code = IDX_CODES[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool = False):
    """Write ``arr`` to ``path`` as an IDX file (gzipped if ``gz``); returns ``path``."""
    data = idx_bytes(arr)
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- reference comparisons (fisher, ntk)
#: the MC Fisher is compared with the reference built on the *same* labels: the library draws them with
#: ``likelihood.sample(f (N, C), k, generator)`` once per chunk in data order; with a single chunk (N <= the
#: default chunk of 256) the test draws them the same way with an identically seeded generator.
SEED = 1234
K_MC = 3
ENGINES = ("layerwise", "functional", "auto")


def engines_for(arch: str) -> tuple[str, ...]:
    return ENGINES if ARCHS[arch].layerwise else ("functional", "auto")


def mc_kwargs(kind: str) -> dict:
    """Library keyword arguments; a fresh, identically seeded generator for every call."""
    if kind != "mc":
        return {}
    return {"samples": K_MC, "generator": torch.Generator().manual_seed(SEED)}


def mc_labels(model, X, lik: str, kind: str):
    if kind != "mc":
        return None
    with torch.no_grad():
        f = model(X).reshape(len(X), -1)
    return LIKS[lik].make().sample(f, K_MC, torch.Generator().manual_seed(SEED))


def reference_case(arch, lik, kind, seed=0):
    """``(model, X, Y, F_ref, labels)``: a zoo model, its targets, the reference Fisher and the MC labels."""
    model, X = build(arch, seed)
    Y = targets(lik, len(X), ARCHS[arch].C, seed)
    labels = mc_labels(model, X, lik, kind)
    F_ref = ref.fisher(model, X, Y, LIKS[lik].spec, kind, labels=labels)
    return model, X, Y, F_ref, labels


# ----------------------------------------------------------------------------- the layerwise engine's calls
def owned_calls(model, X):
    """``(fm, plan, calls, f)``: the owned layers' recorded calls and the flat outputs of one tapped forward."""
    from fisherlens._core import Capture, FunctionalModel, plan_for

    fm = FunctionalModel(model)
    plan = plan_for(fm)
    rec = Capture(m for _, mods in plan.owned.values() for m in mods)
    try:
        with torch.enable_grad():
            f = fm(fm.params, X)
    finally:
        rec.close()
    return fm, plan, rec.calls, f
