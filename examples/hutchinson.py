"""Hutchinson ("detach-and-mix") estimates of diag F and tr F with honest standard errors.

One backward pass per batch and draw; for one diagonal entry the coefficient of variation of a single
Rademacher draw is at most √2 (docs/conventions.md#hutchinson-estimator).

Run: python examples/hutchinson.py
"""

import math

import torch

import fisherlens as fl


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    X, y = torch.randn(256, 16), torch.randint(0, 10, (256,))
    data, lik = (X, y), fl.Categorical()
    g = torch.Generator().manual_seed(0)

    exact = fl.fisher_trace(model, data, lik)
    print(f"exact tr F = {exact:.5f}")
    for method in ("hutchinson", "mc"):
        for S in (32, 256):
            est = fl.fisher_trace(model, data, lik, method=method, samples=S, generator=g)
            z = (est.value - exact) / est.stderr
            print(f"{method:10s} S = {S:3d}: {est.value:.5f} ± {est.stderr:.5f}   z = {z:+.2f}")
            assert abs(z) < 6  # a t-statistic with S − 1 degrees of freedom

    # Single-draw coefficient of variation per diagonal entry: stderr·√S is the standard deviation of one draw.
    S = 200
    d = fl.fisher_diag(model, data, lik)
    est = fl.fisher_diag(model, data, lik, method="hutchinson", samples=S, generator=g)
    keep = d > 1e-6 * d.max()
    cv = est.stderr[keep] * math.sqrt(S) / d[keep]
    print(f"single-draw CV over {int(keep.sum())} entries: median {float(cv.median()):.3f}, "
          f"max {float(cv.max()):.3f} (Rademacher bound √2 = {math.sqrt(2):.3f}; each CV estimated from {S} draws)")
    assert float(cv.median()) < 1.2 * math.sqrt(2)  # the bound, plus the sampling error of a CV from S draws
    per = fl.fisher_diag(model, data, lik, method="hutchinson", samples=S, per_sample=True, generator=g)
    cv_per = per.stderr[keep] * math.sqrt(S) / d[keep]
    print(f"per_sample=True drops the cross-sample terms: median CV {float(cv_per.median()):.3f}")

if __name__ == "__main__":
    main()
