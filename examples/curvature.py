"""Scalar curvature of the Fisher metric of a two-parameter model, and the analytic checks behind it.

Conventions and signs: docs/conventions.md#curvature (unit 2-sphere R = +2). Run: python examples/curvature.py
"""

import math

import torch

import fisherlens as fl


def sphere(th):
    return torch.diag(torch.stack([torch.ones_like(th[0]), torch.sin(th[0]) ** 2]))


def gaussian(th):  # the Fisher metric of N(μ, σ²) in (μ, σ)
    return torch.diag(torch.stack([1 / th[1] ** 2, 2 / th[1] ** 2]))


class Neuron(torch.nn.Module):  # f(x) = sigmoid(w x + b): two parameters, one output
    def __init__(self, w: float, b: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([b], dtype=torch.float64))

    def forward(self, x):
        return torch.sigmoid(x * self.w + self.b)  # (B, 1)


def main() -> None:
    print(f"unit sphere: R = {fl.geometry.scalar_curvature(sphere, torch.tensor([0.7, 0.0])):+.6f} (expected +2)")
    print(f"Gaussian (μ, σ): R = {fl.geometry.scalar_curvature(gaussian, torch.tensor([0.0, 2.0])):+.6f} "
          "(expected −1)")

    x = torch.linspace(-2, 2, 40, dtype=torch.float64)[:, None]
    y = (x[:, 0] > 0.3).double()
    for lik, name in ((fl.Gaussian(0.5), "Gaussian σ = 0.5"), (fl.LossInduced(fl.losses.lp_norm(2)), "L2-norm")):
        kind = "empirical" if isinstance(lik, fl.LossInduced) else "true"  # loss-induced: empirical only
        g = fl.geometry.fisher_metric(Neuron(1.0, 0.0), (x, y), lik, kind)
        ws, bs = torch.linspace(-3, 3, 13), torch.linspace(-2, 2, 9)
        grid = torch.cartesian_prod(ws, bs).double()  # 117 points (w, b)
        c = fl.geometry.curvature(g, grid)  # vectorised; singular points flagged, never silent NaN
        R = c.scalar[~c.singular]
        print(f"{name:16s} ({kind}): R over {len(grid)} grid points in [{float(R.min()):+.3f}, {float(R.max()):+.3f}], "
              f"{int((R < 0).sum())} negative, {int(c.singular.sum())} singular")

    # Length of a straight path in (w, b) under the true Fisher metric, and the KL self-test.
    g = fl.geometry.fisher_metric(Neuron(1.0, 0.0), (x, y), fl.Gaussian(0.5), "true")  # a metric callable
    path = torch.stack([torch.linspace(0.5, 2.0, 100), torch.zeros(100)], 1).double()
    s = fl.geometry.path_length(g, path, rule="midpoint")
    print(f"Fisher length of w: 0.5 → 2 at b = 0: {s:.5f}")
    ratio = fl.geometry.kl_check(Neuron(1.0, 0.0), (x, y), fl.Gaussian(0.5))  # √(2 KL / dθᵀFdθ) → 1
    print(f"KL self-test: {ratio:.8f}")
    assert abs(ratio - 1) < 1e-3 and math.isfinite(s)


if __name__ == "__main__":
    main()
