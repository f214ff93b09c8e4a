"""The exact Fisher of a small MLP, its diagonal, trace and per-layer blocks, and how they agree.

Run: python examples/exact_fisher.py
"""

import torch

import fisherlens as fl


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4)).double().eval()
    X = torch.randn(300, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (300,))
    data, lik = (X, y), fl.Categorical()

    for kind in ("true", "empirical"):
        F = fl.fisher_matrix(model, data, lik, kind=kind)  # (P, P), the mean over the 300 inputs
        d = fl.fisher_diag(model, data, lik, kind=kind)  # (P,), without forming F
        t = fl.fisher_trace(model, data, lik, kind=kind)  # float
        blocks = fl.fisher_blocks(model, data, lik, kind=kind, what="trace")
        assert torch.allclose(F.diagonal(), d, rtol=1e-10)
        assert abs(float(F.trace()) - t) < 1e-10 * t
        assert abs(sum(blocks.values()) - t) < 1e-10 * t
        share = {name: f"{v / t:.1%}" for name, v in blocks.items()}
        print(f"{kind:9s}  P = {F.shape[0]}  tr F = {t:.5f}  per tensor: {share}")

    # The Monte-Carlo Fisher (labels drawn from the model) converges to the true Fisher.
    F_true = fl.fisher_matrix(model, (X, None), lik)
    for k in (1, 16, 256):
        F_mc = fl.fisher_matrix(model, (X, None), lik, kind="mc", samples=k, generator=torch.Generator().manual_seed(0))
        print(f"mc, {k:3d} labels per input: ‖F_mc − F‖/‖F‖ = {float((F_mc - F_true).norm() / F_true.norm()):.4f}")

    # reduction="sum" is N times the mean.
    F_sum = fl.fisher_matrix(model, data, lik, reduction="sum")
    assert torch.allclose(F_sum, 300 * F_true, rtol=1e-10)
    print("reduction='sum' = N × mean: ok")


if __name__ == "__main__":
    main()
