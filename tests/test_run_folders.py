"""Run folders never lose a user's files and never take a result silently: foreign folders are refused, unit
results carry a checksum, broken config.json / summary.md give one-line errors, every ``--set`` option is
validated (a scalar for a list option is a one-element list), concurrent runs of one folder both succeed,
and a foreign checkpoint is refused with the file and the missing keys named."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from fisherlens import plots, runs
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS, STUDIES, mnist_traces, study

pytestmark = pytest.mark.study

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
#: a tiny mnist-traces run (2 units of a few steps)
TINY_MT = ["--set", "widths=4", "--set", "losses='l2_norm'", "--set", "seeds=2", "--set", "epochs=1",
           "--set", "n_train=64", "--set", "n_test=32", "--set", "n_probe=16", "--set", "figures=False"]
#: a tiny two-param run (a few seconds, most of it imports)
TINY_TP = ["--set", "losses='l2_norm'", "--set", "resolution=4", "--set", "steps=3", "--set", "n_data=12"]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("fisherlens: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- foreign folders
def test_foreign_folder_is_refused_and_left_untouched(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "metrics.csv").write_text("my,own\n1,2\n")
    (d / "summary.md").write_text("# my notes\n")
    before = _snapshot(d)
    with pytest.raises(ValueError, match="not a fisherlens run folder") as e:
        runs.RunDir(d, {"seed": 0})
    msg = str(e.value)
    assert str(d) in msg and "metrics.csv" in msg and "summary.md" in msg
    assert main(["run", "two-param", "--quick", "--no-progress", "--out", str(d), *TINY_TP]) == 2
    _one_line_error(capsys, str(d), "not a fisherlens run folder", "metrics.csv")
    assert _snapshot(d) == before  # no marker, no config.json, the user's files as they were


def test_empty_new_and_older_run_folders_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/nested"):
        rd = runs.RunDir(tmp_path / name, {"seed": 0})
        assert (rd.path / runs.RunDir.MARKER).is_file() and runs.read_config(rd.path) == {"seed": 0}
        rd.close()
    old = tmp_path / "old"  # a run folder written before folders had a marker: same config, reused
    old.mkdir()
    runs.atomic_write_json(old / "config.json", {"seed": 0})
    (old / "summary.md").write_text("old run\n")
    with runs.RunDir(old, {"seed": 0}) as rd:
        assert (rd.path / rd.MARKER).is_file()


def test_out_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "two-param", "--quick", "--no-progress", "--out", str(f), *TINY_TP]) == 2
    _one_line_error(capsys, "not a folder")
    assert f.read_text() == "x"


# ------------------------------------------------------------------------------------- config.json and summary.md
def _run_folder(tmp_path, config_bytes: bytes | None = None, summary: bytes = b"# summary\n") -> Path:
    d = tmp_path / "run"
    runs.RunDir(d, {"seed": 0}).close()
    (d / "summary.md").write_bytes(summary)
    if config_bytes is not None:
        (d / "config.json").write_bytes(config_bytes)
    return d


def test_config_json_holding_a_list(tmp_path, capsys):
    d = _run_folder(tmp_path, b"[1, 2, 3]\n")
    assert main(["run", "two-param", "--quick", "--no-progress", "--out", str(d), *TINY_TP]) == 2
    _one_line_error(capsys, "config.json", "JSON list")
    assert main(["report", str(d)]) == 2
    _one_line_error(capsys, "config.json", "JSON list")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{\x00"], ids=["invalid-json", "not-utf8"])
def test_config_json_not_valid_json(tmp_path, capsys, content):
    d = _run_folder(tmp_path, content)
    assert main(["run", "two-param", "--quick", "--no-progress", "--out", str(d), *TINY_TP]) == 2
    _one_line_error(capsys, "config.json", "not valid JSON")
    assert main(["report", str(d)]) == 2
    _one_line_error(capsys, "config.json", "not valid JSON")
    assert (d / "config.json").read_bytes() == content


def test_summary_not_utf8(tmp_path, capsys):
    d = _run_folder(tmp_path, summary=b"# r\xe9sum\xe9 in latin-1\n")
    assert main(["report", str(d)]) == 2
    _one_line_error(capsys, "summary.md", "not UTF-8")


# ------------------------------------------------------------------------------------- unit results: checksums
def _work(key, state, save):
    rows = [] if state is None else list(state["rows"])
    for e in range(len(rows), 2):
        rows.append({"unit": key, "epoch": e, "value": 0.1 * (e + 1) + len(key)})
        save({"epoch": e + 1, "rows": rows})
    return rows


def test_edited_unit_result_is_refused(tmp_path):
    u = runs.Units(runs.RunDir(tmp_path / "run", {"a": 1}))
    ref = u.run(["u0", "u1"], _work)
    f = u.result_file("u0")
    doc = json.loads(f.read_text())
    assert len(doc["sha256"]) == 64 and doc["rows"] == ref["u0"]
    doc["rows"][1]["value"] = 123.0  # a hand edit
    f.write_text(json.dumps(doc))
    seen = []
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        u.run(["u0", "u1"], _work, on_done=lambda k, rows: seen.append(k))
    assert str(f) in str(e.value) and "delete it" in str(e.value) and seen == []  # never handed on
    f.write_text(json.dumps(ref["u0"]))  # a bare list of rows (no checksum)
    with pytest.raises(ValueError, match="no checksum"):
        u.result("u0")
    shutil.copy(u.result_file("u1"), f)  # the result of another unit
    with pytest.raises(ValueError, match="holds the result of unit 'u1'"):
        u.result("u0")
    f.unlink()  # deleting it recomputes the unit
    assert u.run(["u0", "u1"], _work) == ref


def test_edited_unit_result_never_reaches_metrics_csv(tmp_path, capsys):
    out = tmp_path / "mt"
    cmd = ["run", "mnist-traces", "--quick", "--no-progress", "--out", str(out), *TINY_MT]
    assert main(cmd) == 0
    metrics = (out / "metrics.csv").read_bytes()
    f = out / "units" / "l2_norm_w4_s0.json"
    f.write_text(f.read_text().replace('"probe_accuracy": ', '"probe_accuracy": 1', 1))
    assert main(cmd) == 2
    _one_line_error(capsys, str(f), "checksum mismatch")
    assert (out / "metrics.csv").read_bytes() == metrics


# ------------------------------------------------------------------------------------- foreign checkpoints
def test_foreign_checkpoint_names_file_and_missing_keys(tmp_path):
    u = runs.Units(tmp_path)
    runs.save_checkpoint(u.checkpoint_file("u0"), {"weights": torch.zeros(3)})
    with pytest.raises(ValueError, match="lacks the key") as e:
        u.run(["u0"], _work, state_keys=("epoch", "rows"))
    msg = str(e.value)
    assert str(u.checkpoint_file("u0")) in msg and "'epoch'" in msg and "'rows'" in msg
    with pytest.raises(ValueError, match="'epoch'"):
        runs.load_checkpoint(u.checkpoint_file("u0"), required=("epoch",))


def test_foreign_checkpoint_in_a_study(tmp_path, capsys):
    out = tmp_path / "mt"
    cmd = ["run", "mnist-traces", "--quick", "--no-progress", "--out", str(out), *TINY_MT]
    assert main(cmd) == 0
    (out / "units" / "l2_norm_w4_s0.json").unlink()  # that unit is to be resumed from its checkpoint ...
    ck = out / "units" / "l2_norm_w4_s0.ckpt.pt"
    runs.save_checkpoint(ck, {"weights": torch.zeros(3)})  # ... which is a valid torch file, but not ours
    assert main(cmd) == 2
    _one_line_error(capsys, str(ck), "'epoch'", "'model'")
    wrong_unit = dict.fromkeys(mnist_traces.CKPT_KEYS) | {"version": 1, "unit": {"loss_fn": "x"}, "epoch": 0}
    runs.save_checkpoint(ck, wrong_unit)
    assert main(cmd) == 2
    _one_line_error(capsys, str(ck), "does not belong")


# ------------------------------------------------------------------------------------- --set options
class _Accepted(Exception):
    """Raised instead of creating the run folder: the options passed validation."""

    def __init__(self, config):
        super().__init__("accepted")
        self.config = json.loads(json.dumps(config, default=str))


@pytest.fixture
def no_run(monkeypatch):
    """Stop every study where the runner would create its run folder (no study runs)."""

    def fake(out, config):
        raise _Accepted(config)

    monkeypatch.setattr(study, "RunDir", fake)


@pytest.mark.parametrize(("name", "option", "check"), [
    ("estimators", "hidden=16", lambda c: c["hidden"] == [16]),
    ("two-param", "lr=0.1", lambda c: all(g["lr"] == 0.1 for g in c["gd"].values()) and len(c["gd"]) == 3),
    ("meanfield-lr", "m_values=16", lambda c: c["m_values"] == [16]),
    ("dlnn", "widths=8", lambda c: c["widths"] == [8]),
    ("dlnn", "depths=2", lambda c: c["depths"] == [2]),
    ("demo", "hidden=16", lambda c: c["hidden"] == [16]),
    ("meanfield-spectrum", "t_values=5", lambda c: c["t_values"] == [5]),
    ("mnist-traces", "widths=8", lambda c: c["widths"] == [8]),
    ("mnist-traces", "losses=l2_norm", lambda c: c["losses"] == ["l2_norm"]),
    ("sloppy", "hidden=16", lambda c: c["hidden"] == [[16]]),
    ("two-param", "losses=l2_norm", lambda c: c["losses"] == ["l2_norm"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_scalar_for_a_list_option(no_run, tmp_path, name, option, check):
    with pytest.raises(_Accepted) as e:
        main(["run", name, "--quick", "--no-progress", "--out", str(tmp_path / "r"), "--set", option])
    assert check(e.value.config), e.value.config


BAD = {
    "demo": ["epochs=0", "n_train=1.5", "n_test=0", "n_probe=-1", "batch_size='x'", "lr=-1", "lr='fast'",
             "hidden=[16, 'a']", "hidden=0", "checkpoints_per_epoch=0"],
    "estimators": ["n_train=0", "n_test=0", "n_probe=0", "hidden=1.5", "epochs=0", "draws=1", "draws=300",
                   "trace_draws=0", "timing_repeats=0", "batch_size=0", "lr=0", "lr=[1]"],
    "dlnn": ["input_dim=1", "train=0", "test=0", "depths='a'", "widths=0", "sigma2=-1", "teacher_var=0",
             "temperature='hot'", "temperature=[1]", "chains=1", "samples=1", "burn_in=-1", "sampler='hmc'",
             "threads=0"],
    "meanfield-lr": ["m_values=[16, 16]", "m_values=0", "n_eta=1", "eta_margin=1", "trials=0", "steps=0",
                     "samples=0", "depth=1", "outputs=0", "momentum=1", "momentum='x'", "threshold=0",
                     "dtype='float16'", "threads=0"],
    "meanfield-spectrum": ["seeds=1", "m_values=16.5", "samples=0", "depth=1", "outputs=0", "t_sweep_m=0",
                           "t_values=[]", "dtype='half'", "library_check_max_m=0", "threads='x'"],
    "mnist-traces": ["epochs=0", "n_train=0", "n_test=0", "n_probe=0", "batch_size=0", "lr=0", "widths=8.5",
                     "losses=3", "losses='l3_norm'", "seeds=0", "measure_per_epoch=0", "threads=0", "figures='no'"],
    "sloppy": ["networks=0", "epochs=0", "n_train=1", "n_test=0", "hidden=2.5", "batch_size=0", "lr=0",
               "easy=-1", "hard=1000000000", "n_gram=0", "top_k=-1", "eigenvectors=0", "threads=0"],
    "two-param": ["n_data=1", "grid=1", "grid=(0, 1, 0)", "resolution=1", "losses=3", "losses='hinge'", "steps=0",
                  "lr='fast'", "lr={'hinge': 1.0}", "theta0=0.5", "steepness=0", "cond_max=1", "regularize=-1",
                  "chunk_size=0", "threads=0"],
}
#: where the message names the option differently from its key
NAMED = {"widths=8.5": "width", "losses=3": "loss", "losses='hinge'": "loss"}


@pytest.mark.parametrize(("name", "option"), [(n, o) for n, opts in BAD.items() for o in opts])
def test_bad_option_is_refused_by_name(no_run, tmp_path, capsys, name, option):
    out = tmp_path / "r"
    assert main(["run", name, "--quick", "--no-progress", "--out", str(out), "--set", option]) == 2
    _one_line_error(capsys, NAMED.get(option, option.partition("=")[0]))
    assert not out.exists()


# ------------------------------------------------------------------------------------- concurrency
def test_second_run_of_a_folder_waits_for_the_lock(tmp_path):
    d = tmp_path / "run"
    held = runs.RunDir(d, {"a": 1})
    child = ("import sys; from fisherlens import runs; rd = runs.RunDir(sys.argv[1], {'a': 1}); "
             "rd.write_text('child.txt', 'done')")
    proc = subprocess.Popen([sys.executable, "-c", child, str(d)], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once the child blocks on the lock
        assert "waiting" in line and str(d) in line, line + proc.stderr.read()
        assert not (d / "child.txt").exists() and proc.poll() is None
        held.close()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.wait()
    assert (d / "child.txt").read_text() == "done"


def test_two_identical_runs_into_one_folder_both_succeed(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "shared"
    cmd = [sys.executable, "-m", "fisherlens.cli", "run", "two-param", "--quick", "--no-progress", *TINY_TP]
    assert subprocess.run([*cmd, "--out", str(ref)], env=ENV, capture_output=True, timeout=300).returncode == 0
    procs = [subprocess.Popen([*cmd, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    for name in ("metrics.csv", "grid.csv", "config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_temporary_names_are_unique(tmp_path):
    (tmp_path / ".fig.png.tmp").mkdir()  # where a fixed temporary name would collide
    (tmp_path / ".a.txt.tmp").mkdir()
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert plots.save_png(fig, tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert runs.atomic_write_text(tmp_path / "a.txt", "x").read_text() == "x"


def test_checkpoint_removed_meanwhile_is_fine(tmp_path):
    u = runs.Units(tmp_path)
    u.save("u0", {"epoch": 1, "rows": []})
    u.checkpoint_file("u0").unlink()  # another process finished the unit and dropped it
    assert u.load("u0") is None
    u.finish("u0", [{"x": 1}])  # no checkpoint left to drop: no error
    u.checkpoint_file("u0").unlink(missing_ok=True)
    assert u.run(["u0"], _work) == {"u0": [{"x": 1}]}


def test_monitor_refuses_a_foreign_metrics_csv(tmp_path):
    import fisherlens as fl

    own = tmp_path / "metrics.csv"
    own.write_text("epoch,acc\n1,0.5\n")
    model = torch.nn.Linear(3, 2)
    X, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="did not write"):
        fl.Monitor(model, fl.Categorical(), (X, y), observables=("loss",), run=tmp_path)
    assert own.read_text() == "epoch,acc\n1,0.5\n"
    fresh = tmp_path / "new"
    mon = fl.Monitor(model, fl.Categorical(), (X, y), observables=("loss",), run=fresh)
    mon.record(0)
    fl.Monitor(model, fl.Categorical(), (X, y), observables=("loss",), run=fresh)  # its own folder: fine



# ------------------------------------------------------------------------------------- the study skeleton
@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_has_a_config_with_quick_overrides(name):
    cls = STUDIES[name]
    assert cls.name == name and cls.description and EXPERIMENTS[name][0] == cls.description
    fields = set(cls.Config.options())
    assert set(cls.Config.QUICK) <= fields and {"seed"} <= fields
    full, quick = cls.Config.create(name), cls.Config.create(name, quick=True)
    assert not full.quick and quick.quick
    explicit = cls.Config.create(name, **cls.Config.QUICK)  # --quick is the QUICK options, nothing else
    assert dataclasses.replace(explicit, quick=True) == quick
    assert cls.Config.create(name, quick=True, seed=3).seed == 3  # an explicit option wins over QUICK


def test_unknown_option_is_refused_before_any_work(tmp_path):
    with pytest.raises(study.UnknownOption, match="'bogus'") as e:
        EXPERIMENTS["two-param"][1](tmp_path / "r", quick=True, bogus=1)
    assert isinstance(e.value, TypeError) and "resolution" in str(e.value)  # the known options are listed
    assert not (tmp_path / "r").exists()


@dataclasses.dataclass
class _ToyConfig(study.StudyConfig):
    QUICK = {"n": 2}
    n: int = 5
    threads: int | None = 1

    def validate(self):
        super().validate()
        if self.n < 1:
            raise ValueError(f"n must be ≥ 1, got {self.n}")


class _Toy(study.Study):
    name, description, Config = "toy", "a toy study", _ToyConfig

    def setup(self, cfg):
        return list(range(cfg.n))

    def compute(self, cfg, run):
        assert torch.get_num_threads() == cfg.threads  # the runner pinned them
        run.write_csv("metrics.csv", [{"i": i, "sq": i * i} for i in run.inputs])
        run.lap("squares")
        return sum(run.inputs)

    def figures(self, results, run):
        return {"none.png": "no figure, just a name"}

    def report(self, results, run):
        return f"total {results}; figures {sorted(run.figures)}; laps {sorted(run.laps)}\n"


def test_runner_owns_folder_config_threads_and_summary(tmp_path):
    before = torch.get_num_threads()
    path = study.run_study(_Toy, tmp_path / "toy", quick=True, seed=4, progress=False)
    assert torch.get_num_threads() == before
    assert runs.read_config(path) == {"experiment": "toy", "quick": True, "seed": 4, "n": 2, "threads": 1}
    assert runs.read_csv(path / "metrics.csv") == [{"i": "0", "sq": "0"}, {"i": "1", "sq": "1"}]
    assert (path / "summary.md").read_text() == "total 1; figures ['none.png']; laps ['squares']\n"
    with pytest.raises(ValueError, match="n must be"):
        study.run_study(_Toy, tmp_path / "bad", n=0)
    with pytest.raises(ValueError, match="threads"):
        study.run_study(_Toy, tmp_path / "bad", threads=0)
    assert not (tmp_path / "bad").exists()
