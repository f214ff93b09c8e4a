"""The Fisher–NTK trace relation for the loss families of Sauter (2023, eqs 5.1.2, 5.1.5–5.1.7).

tr F_emp = (1/N) Σ_n r_nᵀ Θ_nn r_n with r_n = ∂ℓ/∂f(x_n); for the true Fisher tr F = (1/N) Σ_n tr(Λ_n Θ_nn).
See docs/conventions.md#trace-relation.

Run: python examples/fisher_ntk.py
"""

import torch

import fisherlens as fl


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    X, y = torch.randn(128, 12), torch.randint(0, 5, (128,))
    onehot = torch.nn.functional.one_hot(y, 5).float()

    ntk = fl.ntk(model, X)  # (128, 128, 5, 5): summed over parameters, never averaged over outputs
    per_input = ntk.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).sum(-1)  # tr Θ_nn, (128,)
    assert abs(fl.ntk_trace(model, X, reduction="mean") - float(per_input.mean())) < 1e-3

    losses = {
        "L2 norm": fl.losses.lp_norm(2), "L4 norm": fl.losses.lp_norm(4), "mean power 2": fl.losses.mean_power(2),
        "mean power 4": fl.losses.mean_power(4), "cross-entropy": fl.losses.softmax_cross_entropy(),
    }
    print(f"{'loss':14s} {'tr F_emp':>10s} {'NTK side':>10s} {'(1/N) tr Θ':>11s} {'ratio':>8s}")
    for name, loss in losses.items():
        rel = fl.fisher_ntk_trace(model, (X, onehot), fl.LossInduced(loss), kind="empirical")
        assert abs(rel.fisher_trace - rel.ntk_side) <= 1e-4 * rel.fisher_trace
        print(f"{name:14s} {rel.fisher_trace:10.5f} {rel.ntk_side:10.5f} {rel.ntk_trace:11.4f} {rel.ratio:8.5f}")

    # The true Fisher of the categorical model: tr F = (1/N) Σ tr(Λ_n Θ_nn), Λ = diag π − ππᵀ.
    rel = fl.fisher_ntk_trace(model, (X, None), fl.Categorical(), kind="true")
    pi = torch.softmax(model(X), -1).detach()
    lam = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    blocks = ntk[torch.arange(128), torch.arange(128)]  # Θ_nn, (128, 5, 5)
    by_hand = float((lam * blocks).sum((1, 2)).mean())
    assert abs(by_hand - rel.fisher_trace) < 1e-4 * rel.fisher_trace
    print(f"categorical, true: tr F = {rel.fisher_trace:.5f} = (1/N) Σ tr(Λ Θ_nn) = {by_hand:.5f}")


if __name__ == "__main__":
    main()
