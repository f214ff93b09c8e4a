"""The command line: list, run (the quick demo), report, and one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json
import math

import pytest

import fisherlens as fl
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS

FIGURES = [
    "training.png",
    "fisher_traces.png",
    "batch_traces.png",
    "fisher_ntk_relation.png",
    "geometry.png",
    "layer_traces.png",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo run shared by the tests below (a few seconds); those tests are marked ``study``."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    assert main(["run", "demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "demo" in text
    for name, (desc, fn) in EXPERIMENTS.items():
        assert name in text and desc[:30] in text and callable(fn)


@pytest.mark.study
def test_run_demo_quick_writes_run_folder(quick_run):
    for name in ["config.json", "metrics.csv", "steps.csv", "summary.md", *FIGURES]:
        assert (quick_run / name).is_file(), name
    for name in FIGURES:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in quick_run.iterdir() if p.name.endswith(".tmp")]

    cfg = json.loads((quick_run / "config.json").read_text())
    assert cfg["experiment"] == "demo" and cfg["quick"] is True and cfg["seed"] == 0

    with open(quick_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 2 and rows[0]["step"] == "0"
    path = 0.0
    for r in rows:
        t, e, k = float(r["fisher_trace"]), float(r["fisher_emp"]), float(r["ntk_trace"])
        assert t > 0 and e > 0 and k > 0
        # Fisher–NTK identity for both kinds, and per-layer traces summing to the total
        assert math.isclose(float(r["ntk_side"]), t, rel_tol=1e-4)
        assert math.isclose(float(r["ntk_side_emp"]), e, rel_tol=1e-4)
        assert math.isclose(float(r["relation_ratio"]), t / k, rel_tol=1e-6)
        layers = [float(v) for c, v in r.items() if c.startswith("layer_true:")]
        assert len(layers) == 6 and math.isclose(sum(layers), t, rel_tol=1e-4)
        assert 0 < float(r["relation_ratio"]) < 1 and 0 < float(r["top_eigenvalue"]) <= t * (1 + 1e-5)
        assert float(r["rao_norm"]) > 0 and float(r["grad_norm"]) > 0
        assert float(r["path_length"]) >= path  # cumulative
        path = float(r["path_length"])
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["test_acc"]) <= 1
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["loss"]) > 0
    assert path > 0

    with open(quick_run / "steps.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1)) and len(steps) == int(rows[-1]["step"])
    assert all(float(r["batch_fisher_emp"]) > 0 and float(r["batch_fisher_true_hutchinson"]) > 0 for r in steps)

    summary = (quick_run / "summary.md").read_text()
    assert "## Final numbers" in summary and "**CHECK**" not in summary
    for name in FIGURES:
        assert f"]({name})" in summary  # relative links


@pytest.mark.study
def test_rerun_same_config_is_deterministic(quick_run, tmp_path):
    from fisherlens.experiments.demo import demo

    out = demo(tmp_path / "again", quick=True, progress=False)
    assert (out / "metrics.csv").read_text() == (quick_run / "metrics.csv").read_text()


@pytest.mark.study
def test_report(quick_run, capsys):
    assert main(["report", str(quick_run)]) == 0
    out = capsys.readouterr().out
    summary = (quick_run / "summary.md").read_text()
    assert out.startswith(summary)
    listed = [line.strip() for line in out[len(summary):].splitlines() if line.strip().endswith(".png")]
    assert sorted(listed) == sorted(str(quick_run / f) for f in FIGURES)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("fisherlens: error:") and "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err
    return err


def test_report_missing(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "no such run folder")
    assert main(["report", str(tmp_path)]) == 2
    _one_line_error(capsys, "no summary.md")


def test_unknown_experiment(tmp_path, capsys):
    assert main(["run", "nonsense", "--out", str(tmp_path / "x")]) == 2
    _one_line_error(capsys, "unknown experiment 'nonsense'", "demo")
    assert not (tmp_path / "x").exists()


@pytest.mark.study
def test_run_refuses_folder_of_other_config(quick_run, capsys):
    before = (quick_run / "config.json").read_text()
    assert (
        main(["run", "demo", "--quick", "--seed", "1", "--out", str(quick_run), "--no-progress"])
        == 2
    )
    _one_line_error(capsys, "different config", "seed")
    assert (quick_run / "config.json").read_text() == before


def test_run_bad_data(tmp_path, capsys):
    assert main(["run", "demo", "--quick", "--data", "cifar", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "Unknown dataset 'cifar'")
    assert not (tmp_path / "r").exists()


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["run", "demo", "--seed", "x"])
    assert e.value.code == 2


@pytest.mark.study
def test_set_options_reach_the_experiment(tmp_path, capsys):
    assert main(["run", "demo", "--quick", "--no-progress", "--out", str(tmp_path / "a"), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["run", "demo", "--quick", "--out", str(tmp_path / "b"), "--set", "1x=2"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    out = tmp_path / "c"
    assert main(["run", "demo", "--quick", "--no-progress", "--out", str(out), "--set", "epochs=1"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 1


def test_version(capsys):
    """``fisherlens --version`` prints the package's one version (also the wheel's, via pyproject's dynamic field)."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fisherlens {fl.__version__}"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_run_name_help_lists_the_study_options(name, capsys):
    from fisherlens.experiments import STUDIES

    assert main(["run", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "--threads" in out
    cfg = STUDIES[name].Config
    for opt, typ, default, quick, _ in cfg.help_rows():
        line = f"  {opt} ({typ}) = {default}" + (f"; --quick: {quick}" if quick else "")
        assert line in out.splitlines(), line
    assert {r[0] for r in cfg.help_rows()} == set(cfg.options())


def test_run_help_without_name(capsys):
    assert main(["run", "--help"]) == 0
    assert "usage: fisherlens run" in capsys.readouterr().out
    assert main(["run"]) == 2
    _one_line_error(capsys, "experiment name")


@pytest.mark.parametrize(("setting", "words"), [
    ("epochs=abc", ["'epochs' expects int", "'abc'"]),
    ("epochs=2.5", ["'epochs' expects int", "2.5"]),
    ("lr=fast", ["'lr' expects float", "'fast'"]),
    ("hidden=[16, 'x']", ["'hidden' expects tuple of int"]),
    ("threads=0", ["threads must be a positive integer"]),
    ("foo=1", ["unknown option(s) 'foo'", "epochs"]),
])
def test_set_values_are_checked_naming_the_option(setting, words, tmp_path, capsys):
    assert main(["run", "demo", "--quick", "--out", str(tmp_path / "r"), "--set", setting]) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "r").exists()


def test_threads_and_device_options(tmp_path, capsys):
    assert main(["run", "demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "CPU only", "--device")
    assert main(["run", "lm-fisher", "--quick", "--device", "tpu9", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "device")
    if not __import__("torch").cuda.is_available():
        assert main(["run", "lm-fisher", "--quick", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
        _one_line_error(capsys, "CUDA device(s)", "cpu")
    assert main(["run", "demo", "--quick", "--threads", "0", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "threads")
    assert not (tmp_path / "r").exists()


@pytest.mark.study
@pytest.mark.parametrize(("argv", "want"), [([], 1), (["--threads", "2"], 2)])
def test_threads_are_pinned_during_the_run(argv, want, tmp_path, monkeypatch):
    import torch

    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    before = torch.get_num_threads()
    assert main(["run", "demo", "--quick", "--no-progress", *argv, "--out", str(tmp_path / "t")]) == 0
    assert seen == [want, before]  # pinned for the run, restored after it
