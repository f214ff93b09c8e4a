"""Mean-field λ_max of random networks and the critical learning rate η_c = 2(1 + μ)/λ_max.

Theory: Karakida, Akaho & Amari (2019), docs/conventions.md#mean-field-theory. A random tanh network's measured
λ_max is compared with the theory, then full-batch gradient descent with momentum runs just below and above η_c.

Run: python examples/meanfield_lr.py
"""

import torch

import fisherlens as fl

M, L, C, T, MU = 128, 3, 1, 128, 0.9


def train(eta: float, seed: int) -> float:
    """Final loss (1/T) Σ ½‖f − y‖² of 50 steps of momentum GD; its Hessian at a fit is the Gaussian Fisher."""
    g = torch.Generator().manual_seed(seed)
    net = fl.theory.random_mlp("tanh", 3.0, 0.64, [M] * L + [C], generator=g)
    X = torch.randn(T, M, dtype=torch.float64, generator=g)
    y = 0.1 * torch.randn(T, C, dtype=torch.float64, generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=eta, momentum=MU)
    for _ in range(50):
        loss = 0.5 * ((net(X) - y) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not torch.isfinite(loss) or loss > 1e6:
            return float("inf")
    return float(loss.detach())


def main() -> None:
    mf = fl.theory.meanfield("tanh", 3.0, 0.64, depth=L, outputs=C, samples=T)
    lam_theory = mf.max_eigenvalue(M)
    eta_c = mf.critical_learning_rate(M, momentum=MU)
    print(f"{mf}\nmean-field: λ_max = {lam_theory:.2f}, η_c = {eta_c:.5f} (momentum {MU})")

    lams = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        net = fl.theory.random_mlp("tanh", 3.0, 0.64, [M] * L + [C], generator=g)
        X = torch.randn(T, M, dtype=torch.float64, generator=g)
        lams.append(float(fl.eigenvalues(net, (X, None), fl.Gaussian(1.0), k=1, method="gram")[0]))
    lam = sum(lams) / len(lams)
    print(f"measured λ_max over 3 networks: {lam:.2f} ({lam / lam_theory - 1:+.1%} vs theory; 1/M corrections)")
    assert abs(fl.critical_learning_rate(lam, momentum=MU) - 2 * (1 + MU) / lam) < 1e-12

    outcome = {}
    for factor in (0.5, 2.0):
        losses = [train(factor * eta_c, seed) for seed in range(3)]
        outcome[factor] = "diverged" if all(v == float("inf") for v in losses) else "converged"
        print(f"η = {factor:.1f} η_c: final losses {', '.join(f'{v:.3g}' for v in losses)} -> {outcome[factor]}")
    assert outcome == {0.5: "converged", 2.0: "diverged"}


if __name__ == "__main__":
    main()
