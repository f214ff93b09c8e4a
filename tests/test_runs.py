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


# ------------------------------------------------------------------------- checkpoints and units of work
def test_checkpoint_roundtrip(tmp_path):
    import torch

    gen = torch.Generator().manual_seed(3)
    torch.rand(5, generator=gen)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": 4,
             "rows": [{"a": 0.1 + 0.2, "s": "x", "n": None}], "nested": (1, [2.5, "y"])}
    p = runs.save_checkpoint(tmp_path / "c" / "ck.pt", state)
    assert p == tmp_path / "c" / "ck.pt" and _leftovers(p.parent) == []
    got = runs.load_checkpoint(p)
    assert got["epoch"] == 4 and got["rows"] == state["rows"] and got["nested"] == (1, [2.5, "y"])
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v)
    assert torch.equal(got["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    g2 = torch.Generator()
    g2.set_state(got["gen"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=gen))


def test_checkpoint_missing_corrupt_and_unsafe(tmp_path):
    assert runs.load_checkpoint(tmp_path / "none.pt", missing_ok=True) is None
    with pytest.raises(FileNotFoundError):
        runs.load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        runs.load_checkpoint(bad)
    # arbitrary objects are refused by weights_only=True loading
    runs.save_checkpoint(tmp_path / "obj.pt", {"x": _Opaque()})
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        runs.load_checkpoint(tmp_path / "obj.pt")
    with pytest.raises(TypeError, match="mapping"):
        runs.save_checkpoint(tmp_path / "l.pt", [1, 2])


class _Opaque:
    pass


def test_checkpoint_keeps_old_file_when_save_dies(tmp_path, monkeypatch):
    import torch

    p = runs.save_checkpoint(tmp_path / "ck.pt", {"epoch": 1})

    def dies(obj, fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(p, {"epoch": 2})
    monkeypatch.undo()
    assert runs.load_checkpoint(p) == {"epoch": 1}
    assert _leftovers(tmp_path) == []


def _counting_work(calls, crash_at=None):
    """A unit = 3 'epochs' adding i to a running total; checkpoints each epoch; optionally raises."""

    def work(key, state, save):
        calls.append((key, None if state is None else state["epoch"]))
        start, total = (0, 0.0) if state is None else (state["epoch"], state["total"])
        rows = [] if state is None else list(state["rows"])
        for e in range(start, 3):
            total += (e + 1) * 0.1 * (1 + len(key) + ord(key[-1]) % 7)
            rows.append({"unit": key, "epoch": e, "total": total})
            save({"epoch": e + 1, "total": total, "rows": rows})
            if crash_at == (key, e):
                raise RuntimeError("injected crash")
        return rows

    return work


def test_units_resume_after_crash_gives_identical_rows(tmp_path):
    keys = ["u0", "u1", "u2"]
    ref = runs.Units(tmp_path / "ref").run(keys, _counting_work([]))
    calls: list = []
    u = runs.Units(runs.RunDir(tmp_path / "run", {"a": 1}))
    with pytest.raises(RuntimeError, match="injected"):
        u.run(keys, _counting_work(calls, crash_at=("u1", 1)))
    assert u.is_done("u0") and not u.is_done("u1") and u.checkpoint_file("u1").exists()
    assert not (u.path / "u2.json").exists()
    calls.clear()
    seen = []
    got = u.run(keys, _counting_work(calls), on_done=lambda k, rows: seen.append((k, len(rows))))
    assert calls == [("u1", 2), ("u2", None)]  # u0 read back, u1 resumed after its 2nd epoch, u2 fresh
    assert got == ref and seen == [("u0", 3), ("u1", 3), ("u2", 3)]
    assert not any(p.name.endswith(runs.Units.CKPT) for p in u.path.iterdir())
    assert _leftovers(u.path) == []
    # floats come back exactly
    assert got["u2"][-1]["total"] == ref["u2"][-1]["total"]


def test_units_stale_checkpoint_and_bad_input(tmp_path):
    u = runs.Units(tmp_path)
    u.run(["a"], _counting_work([]))
    runs.save_checkpoint(u.checkpoint_file("a"), {"epoch": 1})  # killed between result and checkpoint removal
    calls: list = []
    u.run(["a"], _counting_work(calls))
    assert calls == [] and not u.checkpoint_file("a").exists()
    with pytest.raises(ValueError, match="unique"):
        u.run(["b", "b"], _counting_work([]))
    with pytest.raises(ValueError, match="file-name-safe"):
        u.run(["../x"], _counting_work([]))
    u.result_file("a").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt unit result"):
        u.result("a")
