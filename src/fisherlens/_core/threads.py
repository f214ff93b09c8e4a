"""Thread pools: the BLAS of numpy/scipy kept to one thread next to fisherlens' own torch kernels."""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

from threadpoolctl import ThreadpoolController


@cache
def _scipy_blas() -> tuple:
    """The BLAS controllers of the libraries loaded by numpy and scipy (not torch's), found once per process: the
    scan of the loaded libraries costs about a millisecond, as much as a small model's training step."""
    libs = ThreadpoolController().lib_controllers
    return tuple(c for c in libs if c.user_api == "blas" and "torch" not in c.filepath)


@contextmanager
def scipy_blas_one_thread():
    """Inside, the BLAS libraries numpy and scipy loaded (not torch's) run on one thread; restored on exit.

    An iterative scipy solver (ARPACK's ``eigsh``) calls BLAS on a few P-vectors between Fisher–vector products.
    With its default pool, OpenBLAS's threads keep spinning after each call and take the cores from torch's kernels:
    the top eigenvalue of an MLP (P = 118k, 2 cores) took 3–4× longer.  One thread is plenty for that level-1/2
    work."""
    libs = _scipy_blas()
    saved = [c.num_threads for c in libs]
    for c in libs:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(libs, saved, strict=True):
            c.set_num_threads(n)
