"""Small matplotlib helpers that save PNG figures for run folders.

They draw on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no global backend
switch, no display needed.  Every function writes one PNG (parent folders created, written
atomically) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import atomic_write_bytes

__all__ = ["line_plot", "line_panels", "bar_plot", "diag_scatter"]

DPI = 120

ArrayLike = Sequence[float] | np.ndarray


def _arr(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=float).ravel()


def save_png(fig: Figure, path: str | os.PathLike, *, tight: bool = True, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG atomically (:func:`fisherlens.runs.atomic_write_bytes`: a uniquely named temp
    file in the same folder, fsync, ``os.replace``, so concurrent writers never clash); returns the path.

    ``tight=False`` keeps a layout set by hand (``tight_layout`` costs seconds on large multi-panel figures).
    """
    FigureCanvasAgg(fig)
    if tight:
        fig.tight_layout()
    return atomic_write_bytes(path, lambda fh: fig.savefig(fh, dpi=dpi, format="png"))


def _draw_lines(ax, x, series, stds, *, xlabel, ylabel, title, logy, styles=None) -> None:
    x = _arr(x)
    for name, y in series.items():
        y = _arr(y)
        kw = {"marker": "o", "markersize": 3, "linewidth": 1.6, **((styles or {}).get(name, {}))}
        (line,) = ax.plot(x, y, label=name, **kw)
        if stds and name in stds:
            s = _arr(stds[name])
            lo = y - s
            if logy:  # keep the band drawable on a log axis
                lo = np.where(lo > 0, lo, np.nan)
            ax.fill_between(x, lo, y + s, color=line.get_color(), alpha=0.2, linewidth=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if len(series) > 1:
        ax.legend(frameon=False)


def line_plot(
    path: str | os.PathLike,
    x: ArrayLike,
    series: Mapping[str, ArrayLike],
    *,
    stds: Mapping[str, ArrayLike] | None = None,
    styles: Mapping[str, Mapping] | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
    logy: bool = False,
    figsize: tuple[float, float] = (6.4, 4.2),
) -> Path:
    """Several series against a common x (e.g. training step), with optional ±std bands.

    Args:
        path: PNG to write.
        x: shared x values ``(T,)``.
        series: ``{label: values (T,)}``.
        stds: optional ``{label: std (T,)}``; a shaded band ``values ± std`` is drawn for those
            labels.
        styles: optional ``{label: matplotlib line kwargs}`` overriding the default style
            (``marker="o", markersize=3, linewidth=1.6``).
        xlabel, ylabel, title: axis labels and title.
        logy: logarithmic y axis.
        figsize: inches.

    Returns:
        The path written.

    Example:
        >>> import pathlib, tempfile
        >>> from fisherlens.plots import line_plot
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "loss.png"
        >>> path = line_plot(out, [0, 1, 2], {"train": [1.0, 0.5, 0.25], "test": [1.1, 0.7, 0.6]}, ylabel="loss")
        >>> path.name, path.read_bytes()[1:4]
        ('loss.png', b'PNG')
    """
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    _draw_lines(
        ax, x, series, stds, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy, styles=styles
    )
    return save_png(fig, path)


def line_panels(
    path: str | os.PathLike,
    x: ArrayLike,
    panels: Sequence[Mapping],
    *,
    xlabel: str = "step",
    title: str = "",
    figsize: tuple[float, float] | None = None,
) -> Path:
    """Vertically stacked line plots sharing the x axis.

    Args:
        path: PNG to write.
        x: shared x values ``(T,)``.
        panels: one mapping per panel with keys ``series`` (``{label: (T,)}``) and optionally
            ``stds``, ``styles``, ``ylabel``, ``title``, ``logy`` (as in :func:`line_plot`).
        xlabel: label of the shared x axis (bottom panel).
        title: figure title.
        figsize: inches (default 6.4 wide, 3 per panel).

    Returns:
        The path written.
    """
    fig = Figure(figsize=figsize or (6.4, 0.6 + 3.0 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, p) in enumerate(zip(axes, panels, strict=True)):
        _draw_lines(
            ax,
            x,
            p["series"],
            p.get("stds"),
            xlabel=xlabel if i == len(panels) - 1 else "",
            ylabel=p.get("ylabel", ""),
            title=p.get("title", ""),
            logy=p.get("logy", False),
            styles=p.get("styles"),
        )
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def bar_plot(
    path: str | os.PathLike,
    values: Mapping[str, float],
    *,
    ylabel: str = "",
    title: str = "",
    log: bool = False,
    annotate: bool = True,
) -> Path:
    """Bar chart of one value per named item (e.g. per-layer Fisher traces).

    Args:
        path: PNG to write.
        values: ``{label: value}`` in display order.
        ylabel, title: labels.
        log: logarithmic value axis (non-positive values are drawn as absent).
        annotate: print each value above its bar.

    Returns:
        The path written.
    """
    labels = list(values)
    v = _arr(list(values.values()))
    fig = Figure(figsize=(max(4.8, 0.9 * len(labels) + 1.5), 4.2))
    ax = fig.add_subplot()
    shown = np.where(v > 0, v, np.nan) if log else v
    bars = ax.bar(range(len(labels)), shown, color="tab:blue", alpha=0.85)
    ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=30 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
    )
    if log:
        ax.set_yscale("log")
        finite = v[v > 0]
        if finite.size:  # head-room for the annotations
            ax.set_ylim(finite.min() / 3, finite.max() * 4)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    if annotate:
        for b, val in zip(bars, v, strict=True):
            if np.isfinite(val) and (val > 0 or not log):
                ax.annotate(
                    f"{val:.3g}",
                    (b.get_x() + b.get_width() / 2, val),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    return save_png(fig, path)


def diag_scatter(
    path: str | os.PathLike,
    true: ArrayLike | Mapping[str, ArrayLike],
    empirical: ArrayLike | Mapping[str, ArrayLike],
    *,
    title: str = "Fisher diagonal: true vs empirical",
    xlabel: str = "true Fisher diagonal",
    ylabel: str = "empirical Fisher diagonal",
    max_points: int = 60_000,
    seed: int = 0,
) -> Path:
    """Log-log scatter of the true vs the empirical Fisher diagonal, with the line y = x.

    Args:
        path: PNG to write.
        true, empirical: diagonals ``(P,)``, or ``{layer: diag}`` dicts with the same keys
            (one colour per layer).
        title, xlabel, ylabel: labels.
        max_points: at most this many points are drawn (a seeded random subset beyond that).
        seed: seed of that subset.

    Entries where either value is not positive cannot be drawn on log axes; their count is
    reported in the legend.

    Returns:
        The path written.
    """
    if isinstance(true, Mapping):
        if not isinstance(empirical, Mapping) or list(true) != list(empirical):
            raise ValueError(
                "true and empirical must both be dicts with the same keys, or both arrays."
            )
        groups = {k: (_arr(true[k]), _arr(empirical[k])) for k in true}
    else:
        groups = {"": (_arr(true), _arr(empirical))}
    total = sum(len(a) for a, _ in groups.values())
    rng = np.random.default_rng(seed)
    keep_frac = min(1.0, max_points / max(1, total))
    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.add_subplot()
    lo, hi, dropped = np.inf, -np.inf, 0
    # smaller groups drawn on top of larger ones
    rank = {k: r for r, k in enumerate(sorted(groups, key=lambda k: -len(groups[k][0])))}
    for name, (a, b) in groups.items():
        if a.shape != b.shape:
            raise ValueError(
                f"diagonal shapes differ{f' for {name}' if name else ''}: {a.shape} vs {b.shape}"
            )
        ok = (a > 0) & (b > 0) & np.isfinite(a) & np.isfinite(b)
        dropped += int((~ok).sum())
        a, b = a[ok], b[ok]
        if keep_frac < 1.0:
            sel = rng.random(len(a)) < keep_frac
            a, b = a[sel], b[sel]
        if len(a):
            lo, hi = min(lo, a.min(), b.min()), max(hi, a.max(), b.max())
        ax.scatter(
            a,
            b,
            s=3,
            alpha=0.35,
            linewidths=0,
            rasterized=True,
            label=name or None,
            zorder=2 + rank[name],
        )
    if np.isfinite(lo):
        ax.plot(
            [lo, hi],
            [lo, hi],
            color="black",
            linewidth=1,
            linestyle="--",
            label="y = x",
            zorder=2 + len(groups),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if dropped:
        ax.plot([], [], " ", label=f"{dropped} zero entries not shown")
    leg = ax.legend(frameon=False, fontsize=8, markerscale=3)
    for h in leg.legend_handles:
        if hasattr(h, "set_alpha"):
            h.set_alpha(1)
    return save_png(fig, path)
