"""The logger protocol, TensorBoard event contents, and the Lightning and transformers callbacks in real trainers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisherlens as fl
from fisherlens.integrations.loggers import TensorBoardLogger

OBS = ("loss", "accuracy", "fisher_trace", "grad_norm", "path_length")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _probe(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _train(model, mon, batches=None, steps=6):
    """``steps`` SGD steps of a plain loop with ``mon.step`` after each (default batches: 4 fresh inputs each)."""
    if batches is None:
        X, y = _probe(2, 24)
        batches = [(X[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (xb, yb) in enumerate(batches):
        if i == steps:
            break
        out = model(xb)
        loss = nn.functional.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss, outputs=out, targets=yb)


def test_logger_protocol_receives_every_record():
    got = []
    model = _mlp()
    mon = fl.Monitor(model, fl.Categorical(), _probe(), observables=OBS, every=2,
                     loggers=lambda values, step: got.append((step, dict(values))))
    mon.record(0)
    _train(model, mon)
    assert [s for s, _ in got] == [r["step"] for r in mon.records] == [0, 2, 4, 6]
    for (_, values), rec in zip(got, mon.records, strict=True):
        assert values == {k: v for k, v in rec.items() if k != "step"}
        assert "batch_loss" in values or rec["step"] == 0


def test_logger_close_and_bad_loggers():
    closed = []

    class L:
        def __call__(self, values, step):
            pass

        def close(self):
            closed.append(True)

    mon = fl.Monitor(_mlp(), fl.Categorical(), _probe(), observables=("loss",), loggers=[L(), L()])
    mon.close()
    assert closed == [True, True]
    with pytest.raises(TypeError, match=r"loggers\[1\]"):
        fl.Monitor(_mlp(), fl.Categorical(), _probe(), observables=("loss",), loggers=[print, "wandb"])


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_every_observable(tmp_path):
    pytest.importorskip("tensorboard")
    model = _mlp()
    mon = fl.Monitor(model, fl.Categorical(), _probe(), observables=OBS, every=3, tensorboard=tmp_path / "tb")
    mon.record(0)
    _train(model, mon)
    mon.close()
    scalars = _scalars(tmp_path / "tb")
    columns = [c for c in mon.columns if c != "step"] + ["batch_loss"]
    assert set(scalars) == set(columns)
    for c in columns:
        want = [(r["step"], r[c]) for r in mon.records if c in r]
        assert [s for s, _ in scalars[c]] == [s for s, _ in want]
        for (_, v), (_, w) in zip(scalars[c], want, strict=True):
            assert math.isclose(v, w, rel_tol=1e-6, abs_tol=1e-7)  # TensorBoard stores float32


def test_tensorboard_logger_prefix(tmp_path):
    pytest.importorskip("tensorboard")
    lg = TensorBoardLogger(tmp_path, prefix="fisher/")
    lg({"a": 1.5, "b": -2.0}, 7)
    lg({"a": 2.5}, 9)
    lg.close()
    assert _scalars(tmp_path) == {"fisher/a": [(7, 1.5), (9, 2.5)], "fisher/b": [(7, -2.0)]}


# ---------------------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _lit_module(pl):
    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp().float()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Lit()


def _loader(n=32, batch=4):
    X, y = _probe(3, n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X.float(), y), batch_size=batch)


def _trainer(pl, tmp_path, cb, **kw):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=kw.pop("max_steps", 6), callbacks=[cb],
                      logger=CSVLogger(tmp_path / "logs", name="t"), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=kw.pop("checkpointing", False), **kw)


def _lit_records_equal_plain(records, every, steps):
    """The same training in a plain loop with a plain Monitor gives the same records."""
    model = _mlp().float()
    Xp, yp = _probe()
    mon = fl.Monitor(model, fl.Categorical(), (Xp.float(), yp), observables=("loss", "fisher_trace",
                                                                             "batch_fisher_trace"), every=every)
    mon.record(0)
    _train(model, mon, _loader(), steps)
    assert [r["step"] for r in records] == [r["step"] for r in mon.records]
    for a, b in zip(records, mon.records, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True)


def test_lightning_callback_records_and_logs(tmp_path):
    pl = _lightning()
    from fisherlens.integrations.lightning import FisherCallback

    Xp, yp = _probe()
    cb = FisherCallback(fl.Categorical(), (Xp.float(), yp), module="net", every=2,
                        observables=("loss", "fisher_trace", "batch_fisher_trace"))
    trainer = _trainer(pl, tmp_path, cb)
    trainer.fit(_lit_module(pl), _loader())
    recs = cb.monitor.records
    assert [r["step"] for r in recs] == [0, 2, 4, 6]
    assert all(math.isfinite(r["batch_fisher_trace"]) for r in recs[1:])
    _lit_records_equal_plain(recs, 2, 6)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "t" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["fisher/fisher_trace"]) for r in rows if r.get("fisher/fisher_trace")}
    assert logged == {r["step"]: pytest.approx(r["fisher_trace"], rel=1e-6) for r in recs}


def test_lightning_checkpoint_carries_the_monitor(tmp_path):
    pl = _lightning()
    from fisherlens.integrations.lightning import FisherCallback

    Xp, yp = _probe()
    opts = dict(module="net", every=2, observables=("loss", "fisher_trace"), method="hutchinson", draws=2)
    first = FisherCallback(fl.Categorical(), (Xp.float(), yp), **opts)
    t1 = _trainer(pl, tmp_path / "b", first, max_steps=4)
    t1.fit(_lit_module(pl), _loader(16))
    t1.save_checkpoint(tmp_path / "b.ckpt")
    saved = first.monitor.state_dict()
    second = FisherCallback(fl.Categorical(), (Xp.float(), yp), **opts)
    restored = {}
    second.driver.start = (lambda start: lambda root, step: (start(root, step),
                                                             restored.update(second.monitor.state_dict()))[0]
                           )(second.driver.start)
    _trainer(pl, tmp_path / "c", second, max_steps=8).fit(_lit_module(pl), _loader(16),
                                                          ckpt_path=tmp_path / "b.ckpt")
    # restored before the first resumed step: records, step count and the generator of the Hutchinson draws
    assert restored["records"] == saved["records"] and restored["step_count"] == 4
    assert torch.equal(restored["generator"], saved["generator"])
    assert [r["step"] for r in second.monitor.records] == [0, 2, 4, 6, 8]  # the start is not recorded again
    assert second.monitor.records[:3] == first.monitor.records


def test_lightning_bad_module_name(tmp_path):
    pl = _lightning()
    from fisherlens.integrations.lightning import FisherCallback

    cb = FisherCallback(fl.Categorical(), _probe(), module="encoder", observables=("loss",))
    with pytest.raises(ValueError, match="no such submodule.*net"):
        _trainer(pl, tmp_path, cb).fit(_lit_module(pl), _loader())


# ---------------------------------------------------------------------------------------------- transformers
def _hf_setup():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (24, 8), generator=g)
    labels = torch.randint(0, 3, (24,), generator=g)
    train = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
             for i in range(16)]
    probe = [{"input_ids": ids[16:], "attention_mask": torch.ones(8, 8, dtype=torch.long), "labels": labels[16:]}]
    return transformers, model, train, probe


def test_transformers_callback_in_a_real_trainer(tmp_path, monkeypatch):
    transformers, model, train, probe = _hf_setup()
    from fisherlens.integrations.transformers import FisherCallback

    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = FisherCallback(fl.Categorical(), probe, every=2, observables=("loss", "fisher_trace", "grad_norm"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=["tensorboard"],
                                          logging_steps=100, save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    cb.attach(trainer)
    trainer.train()
    recs = cb.monitor.records
    assert [r["step"] for r in recs] == [0, 2, 4]
    hist = {h["step"]: h for h in trainer.state.log_history if "fisher/fisher_trace" in h}
    assert sorted(hist) == [0, 2, 4]
    for r in recs:
        assert hist[r["step"]]["fisher/fisher_trace"] == r["fisher_trace"]
    # the value at the final step equals a fresh exact computation on the trained model
    model.eval()
    want = fl.fisher_trace(model, probe, fl.Categorical(), output=lambda o: o.logits)
    assert math.isclose(recs[-1]["fisher_trace"], want, rel_tol=1e-5)
    # report_to=tensorboard received the recorded steps after the start (the start precedes any log call)
    tb = _scalars(next(p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents*")))
    assert [s for s, _ in tb["train/fisher/fisher_trace"]] == [2, 4]


def test_transformers_callback_refuses_batch_trace():
    pytest.importorskip("transformers")
    from fisherlens.integrations.transformers import FisherCallback

    with pytest.raises(ValueError, match="Trainer does not pass"):
        FisherCallback(fl.Categorical(), [], observables=("loss", "batch_fisher_trace"))
