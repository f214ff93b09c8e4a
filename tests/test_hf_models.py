"""Real ``transformers`` models (random initialisation from small configs; nothing is downloaded), float64, eval
mode, with dict batches and ``output=lambda out: out.logits``:

* ``GPT2LMHeadModel``: logits ``(B, T, V)``; batches ``{"input_ids", "attention_mask", "labels"}`` with the labels
  aligned with the logits positions (label at t = token t+1; ``-100`` at the last real position and the padding),
  so the core removes ``labels`` from the model's keyword arguments and the model never shifts them itself;
  ``attention_mask`` (the shape of the output positions) also marks the kept positions.
* ``BertForSequenceClassification`` (3 labels): logits ``(B, 3)``, one prediction per input; its
  ``attention_mask`` ``(B, T)`` is only a model argument.

Exact diagonals (true and empirical) against the slow reference (which calls the HF model one input at a time),
and Hutchinson against exact.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import transformers
from helpers import assert_close, bonferroni_z

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-8
V = 31


def logits(out):
    return out.logits


def hf_forward(model, x):
    return model(**x).logits


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.3, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    lengths = [5, 4, 3]
    ids = torch.randint(1, V, (3, 5), generator=g)
    am = torch.zeros(3, 5, dtype=torch.long)
    labels = torch.full((3, 5), -100)
    for n, ln in enumerate(lengths):
        am[n, :ln] = 1
        ids[n, ln:] = 0
        labels[n, : ln - 1] = ids[n, 1:ln]
    return model, {"input_ids": ids, "attention_mask": am}, labels


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  initializer_range=0.3, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (4, 5), generator=g)
    am = torch.ones(4, 5, dtype=torch.long)
    am[1, 3:] = 0
    am[3, 4:] = 0
    ids[am == 0] = 0
    return model, {"input_ids": ids, "attention_mask": am}, torch.randint(0, 3, (4,), generator=g)


def _case(build, masked: bool):
    """``(model, X, Y, data, want)``: the model, its dict inputs and labels, the data as one dict batch, and the
    cached slow reference diagonal ``want(kind, reduction)``."""
    model, X, Y = build()
    mask = X["attention_mask"].bool() if masked else None
    cache = {}

    def want(kind, reduction="mean"):
        if (kind, reduction) not in cache:
            cache[kind, reduction] = ref.seq_fisher(model, X, Y, kind, "categorical", "last", -100, mask, reduction,
                                                    forward=hf_forward, what="diag")
        return cache[kind, reduction]

    return model, X, Y, [{**X, "labels": Y}], want


@pytest.fixture(scope="module")
def gpt2(float64):
    return _case(_gpt2, masked=True)


@pytest.fixture(scope="module")
def bert(float64):
    return _case(_bert, masked=False)


def test_models_are_what_the_tests_assume(gpt2, bert):
    model, X, Y, _, _ = gpt2
    assert model.transformer.wte.weight is model.lm_head.weight  # tied: one parameter in named_parameters()
    assert hf_forward(model, X).shape == (3, 5, V)
    model, X, Y, _, _ = bert
    assert hf_forward(model, X).shape == (4, 3)


@pytest.mark.parametrize("reduction", ["mean", "per_prediction"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_gpt2_exact_diag_and_trace(gpt2, kind, reduction):
    model, X, Y, data, want = gpt2
    d = fl.fisher_diag(model, data, fl.Categorical(), kind, reduction=reduction, output=logits)
    assert_close(d, want(kind, reduction), RTOL, f"gpt2 {kind} {reduction}")
    t = fl.fisher_trace(model, data, fl.Categorical(), kind, reduction=reduction, output=logits)
    assert math.isclose(t, float(want(kind, reduction).sum()), rel_tol=RTOL)


def test_gpt2_per_prediction_count(gpt2):
    """per_prediction divides by the non-ignored positions (4 + 3 + 2 = 9), mean by the 3 inputs."""
    model, X, Y, data, want = gpt2
    assert int((Y != -100).sum()) == 9
    assert_close(want("true", "per_prediction") * 9, want("true", "mean") * 3, 1e-12, "reference")


def test_gpt2_hutchinson(gpt2):
    model, X, Y, data, want = gpt2
    d = want("true")
    S = 300
    e = fl.fisher_diag(model, data, fl.Categorical(), method="hutchinson", samples=S,
                       generator=torch.Generator().manual_seed(3), output=logits)
    assert isinstance(e, fl.Estimate)
    z = bonferroni_z(d.numel())
    bad = (e.value - d).abs() > z * e.stderr + 1e-12 * float(d.max())
    assert not bad.any(), f"{int(bad.sum())} of {d.numel()} entries outside {z:.1f} stderr"
    t = fl.fisher_trace(model, data, fl.Categorical(), method="hutchinson", samples=S,
                        generator=torch.Generator().manual_seed(4), output=logits)
    assert abs(t.value - float(d.sum())) < 4 * t.stderr


def test_gpt2_needs_output(gpt2):
    model, X, Y, data, _ = gpt2
    with pytest.raises(TypeError, match="output="):
        fl.fisher_trace(model, data, fl.Categorical())


@pytest.mark.parametrize("reduction", ["mean", "per_prediction"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_bert_exact_diag(bert, kind, reduction):
    model, X, Y, data, want = bert
    d = fl.fisher_diag(model, data, fl.Categorical(), kind, reduction=reduction, output=logits)
    assert_close(d, want(kind, reduction), RTOL, f"bert {kind} {reduction}")
    if reduction == "per_prediction":  # one prediction per input: the two normalisations agree
        assert_close(d, want(kind, "mean"), RTOL, "per_prediction = mean")


def test_bert_hutchinson(bert):
    model, X, Y, data, want = bert
    d = want("true")
    S = 300
    e = fl.fisher_diag(model, data, fl.Categorical(), method="hutchinson", samples=S,
                       generator=torch.Generator().manual_seed(5), output=logits)
    z = bonferroni_z(d.numel())
    bad = (e.value - d).abs() > z * e.stderr + 1e-12 * float(d.max())
    assert not bad.any(), f"{int(bad.sum())} of {d.numel()} entries outside {z:.1f} stderr"


def test_bert_ntk_with_dict_inputs(bert):
    """fl.ntk on dict inputs: (N1, N2, 3, 3), equal to the slow per-input Jacobians."""
    model, X, Y, data, _ = bert
    want = ref.seq_ntk(model, X, forward=hf_forward)
    got = fl.ntk(model, X, output=logits)
    assert got.shape == (4, 4, 3, 3)
    assert_close(got, want, RTOL, "ntk")
    rel = fl.fisher_ntk_trace(model, data, fl.Categorical(), "empirical", output=logits)
    tr = float(ref.seq_fisher(model, X, Y, "empirical", "categorical", forward=hf_forward, what="diag").sum())
    assert math.isclose(rel.fisher_trace, tr, rel_tol=RTOL) and math.isclose(rel.ntk_side, tr, rel_tol=RTOL)
    assert math.isclose(rel.ntk_trace, float(torch.einsum("nnaa->", want)) / 4, rel_tol=RTOL)
