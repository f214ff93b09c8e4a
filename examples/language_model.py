"""The Fisher of a small causal transformer language model: (B, T, V) logits, padded sequences.

Each sequence's Fisher is the sum over its kept tokens of the per-token Fisher (docs/conventions.md#structured-outputs);
labels equal to -100 (padding) are dropped.  The exact empirical diagonal needs one backward per sequence's summed
loss; the true Fisher's Hutchinson estimate one backward per draw, whatever T and V are.

Run: python examples/language_model.py
"""

import torch
from torch import nn

import fisherlens as fl


class TinyLM(nn.Module):
    """Token + position embeddings, one causal self-attention block, a linear head to the vocabulary."""

    def __init__(self, vocab: int = 12, d: int = 16, T: int = 8):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(T, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, ids):
        T = ids.shape[1]
        h = self.block(self.tok(ids) + self.pos[:T], src_mask=self.causal[:T, :T], is_causal=True)
        return self.head(h)  # (B, T, V)


def main() -> None:
    torch.manual_seed(0)
    lm = TinyLM().double().eval()
    ids = torch.randint(0, 12, (6, 9))
    X, Y = ids[:, :-1], ids[:, 1:].clone()  # predict the next token
    Y[0, 5:] = Y[3, 2:] = -100  # two padded sequences
    data, lik = (X, Y), fl.Categorical()

    d = fl.fisher_diag(lm, data, lik, kind="empirical")
    per_layer = fl.fisher_blocks(lm, data, lik, what="trace")
    print(f"P = {d.numel()}, tr F_emp = {float(d.sum()):.4f}")
    print("true Fisher trace per tensor:", {n: round(v, 4) for n, v in per_layer.items() if v > 1e-3})

    exact = fl.fisher_trace(lm, data, lik)
    est = fl.fisher_trace(lm, data, lik, method="hutchinson", samples=200, generator=torch.Generator().manual_seed(0))
    z = (est.value - exact) / est.stderr
    print(f"tr F exact {exact:.4f}, Hutchinson {est.value:.4f} ± {est.stderr:.4f} (z = {z:+.2f})")
    assert abs(z) < 6

    per_token = fl.fisher_trace(lm, data, lik, reduction="per_prediction")
    kept = int((Y != -100).sum())
    print(f"per sequence {exact:.4f} vs per token {per_token:.4f}: ratio {exact / per_token:.3f} "
          f"= kept tokens per sequence {kept / len(X):.3f}")
    assert abs(exact / per_token - kept / len(X)) < 1e-9

    top = fl.eigenvalues(lm, data, lik, k=3, method="lanczos")
    print("top eigenvalues:", [round(float(v), 4) for v in top])


if __name__ == "__main__":
    main()
