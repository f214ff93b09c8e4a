"""Run folders: atomic writes, the config guard, the CSV metrics table, and the PNG helpers."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fisherlens import plots, runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_text(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert runs.atomic_write_text(p, "hello\n") == p
    assert p.read_text() == "hello\n"
    runs.atomic_write_text(p, "ünïcode\n")
    assert p.read_text(encoding="utf-8") == "ünïcode\n"
    assert _leftovers(p.parent) == []


def test_atomic_write_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        p = runs.atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600
        p.chmod(0o600)
        runs.atomic_write_text(p, "y")
        assert stat.S_IMODE(p.stat().st_mode) == 0o600  # an existing file keeps its mode
    finally:
        os.umask(umask)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_json(tmp_path):
    p = runs.atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "a": 1.5, "path": tmp_path})
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [1, 2], "path": str(tmp_path)}


def test_rundir_creates_and_accepts_same_config(tmp_path):
    cfg = {"seed": 0, "hidden": (64, 32), "lr": 1e-3}
    d = tmp_path / "run"
    rd = runs.RunDir(d, cfg)
    assert rd.path == d and d.is_dir()
    assert json.loads((d / "config.json").read_text()) == {
        "seed": 0,
        "hidden": [64, 32],
        "lr": 1e-3,
    }
    rd.write_text("summary.md", "first")
    # the same config (tuple vs list is the same once stored as JSON): allowed, files overwritten
    rd2 = runs.RunDir(d, {"lr": 1e-3, "hidden": [64, 32], "seed": 0})
    rd2.write_text("summary.md", "second")
    assert (d / "summary.md").read_text() == "second"
    assert _leftovers(d) == []


def test_rundir_refuses_different_config(tmp_path):
    d = tmp_path / "run"
    runs.RunDir(d, {"seed": 0, "epochs": 3})
    before = (d / "config.json").read_text()
    with pytest.raises(ValueError, match=r"different config \(differs in: seed\)"):
        runs.RunDir(d, {"seed": 1, "epochs": 3})
    with pytest.raises(ValueError, match="differs in: extra"):
        runs.RunDir(d, {"seed": 0, "epochs": 3, "extra": True})
    assert (d / "config.json").read_text() == before  # the old run is untouched


def test_rundir_refuses_broken_config_or_file(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        runs.RunDir(d, {"seed": 0})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        runs.RunDir(f, {})


def test_write_and_read_csv(tmp_path):
    p = runs.write_csv(
        tmp_path / "m.csv", [{"step": 0, "loss": 2.5}, {"step": 1, "loss": 1.25, "acc": 0.5}]
    )
    assert p.read_text().splitlines() == ["step,loss,acc", "0,2.5,", "1,1.25,0.5"]
    assert runs.read_csv(p) == [
        {"step": "0", "loss": "2.5", "acc": ""},
        {"step": "1", "loss": "1.25", "acc": "0.5"},
    ]
    runs.write_csv(p, [{"a": float("nan"), "b": "x,y"}], columns=["b", "a"])
    assert runs.read_csv(p) == [{"b": "x,y", "a": "nan"}]
    with pytest.raises(ValueError, match="not in columns"):
        runs.write_csv(p, [{"a": 1, "z": 2}], columns=["a"])


def test_float_precision_roundtrips(tmp_path):
    x = 0.1 + 0.2
    p = runs.write_csv(tmp_path / "m.csv", [{"x": x}])
    assert float(runs.read_csv(p)[0]["x"]) == x


def test_append_csv_row(tmp_path):
    p = tmp_path / "m.csv"
    runs.append_csv_row(p, {"step": 0, "loss": 2.0})
    runs.append_csv_row(p, {"step": 1, "loss": 1.0})
    runs.append_csv_row(p, {"step": 2, "loss": 0.5, "acc": 0.9})  # a new column
    assert p.read_text().splitlines() == ["step,loss,acc", "0,2.0,", "1,1.0,", "2,0.5,0.9"]
    assert _leftovers(tmp_path) == []


def test_append_to_header_only_table(tmp_path):
    p = runs.write_csv(tmp_path / "m.csv", [], columns=["step", "loss"])
    runs.append_csv_row(p, {"loss": 1.0, "step": 3})
    assert p.read_text().splitlines() == ["step,loss", "3,1.0"]


# ------------------------------------------------------------------------------------- figures
def _is_png(p):
    return p.is_file() and p.read_bytes()[:8] == PNG_MAGIC


def test_line_plot_with_bands_and_log(tmp_path):
    x = np.arange(5)
    p = plots.line_plot(
        tmp_path / "f" / "lines.png",
        x,
        {"a": np.exp(-x), "b": x + 1.0},
        stds={"a": np.full(5, 0.5)},
        logy=True,
        ylabel="value",
        title="t",
    )
    assert p == tmp_path / "f" / "lines.png" and _is_png(p)
    assert _leftovers(p.parent) == []


def test_line_panels(tmp_path):
    x = [0, 1, 2]
    p = plots.line_panels(
        tmp_path / "p.png",
        x,
        [
            {
                "series": {"a": [1, 2, 3]},
                "ylabel": "a",
                "logy": True,
                "styles": {"a": {"linestyle": "none", "marker": "s"}},
            },
            {"series": {"b": [3, 2, 1], "c": [1, 1, 1]}, "title": "second"},
        ],
        title="panels",
    )
    assert _is_png(p)


def test_bar_plot_log_with_nonpositive(tmp_path):
    p = plots.bar_plot(tmp_path / "b.png", {"w": 3.0, "b": 0.0, "v": 1e-3}, log=True, ylabel="tr")
    assert _is_png(p)


def test_diag_scatter(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.lognormal(size=1000)
    b = a * rng.lognormal(size=1000)
    a[:10] = 0.0
    assert _is_png(plots.diag_scatter(tmp_path / "s.png", a, b))
    groups_t = {"w": a[:600], "b": a[600:]}
    groups_e = {"w": b[:600], "b": b[600:]}
    assert _is_png(plots.diag_scatter(tmp_path / "g.png", groups_t, groups_e, max_points=300))
    with pytest.raises(ValueError, match="same keys"):
        plots.diag_scatter(tmp_path / "x.png", groups_t, b)
    with pytest.raises(ValueError, match="shapes differ"):
        plots.diag_scatter(tmp_path / "x.png", a, b[:5])
    assert not os.path.exists(tmp_path / "x.png")
