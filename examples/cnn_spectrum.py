"""Top eigenvalues of a small CNN's Fisher: Lanczos, the exact Gram (dual) route, and scipy on the operator.

Run: python examples/cnn_spectrum.py
"""

import torch
from scipy.sparse.linalg import eigsh

import fisherlens as fl


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10),
    ).eval()
    X = torch.randn(64, 1, 16, 16)
    data, lik = (X, None), fl.Categorical()  # the true Fisher needs no labels
    P = sum(p.numel() for p in model.parameters())
    print(f"P = {P} parameters, N·C = {64 * 10}")

    top = fl.eigenvalues(model, data, lik, k=5, method="lanczos")  # matrix-free, ARPACK on the operator
    gram = fl.eigenvalues(model, data, lik, method="gram")  # all nonzero eigenvalues from the 640 × 640 dual
    print("Lanczos top 5:", [f"{v:.5f}" for v in top.tolist()])
    print("Gram    top 5:", [f"{v:.5f}" for v in gram[:5].tolist()])
    assert torch.allclose(top, gram[:5], rtol=1e-3)
    rank = int((gram > 1e-6 * gram[0]).sum())
    print(f"numerical rank {rank} ≤ N (C − 1) = {64 * 9}")

    # The same operator as a scipy LinearOperator: any scipy solver works on it.
    op = fl.fisher_operator(model, data, lik)
    vals = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    print("scipy eigsh top 3:", [f"{v:.5f}" for v in sorted(vals, reverse=True)])
    assert abs(max(vals) - float(top[0])) < 1e-3 * float(top[0])

    stats = fl.spectrum_stats(gram, dim=P)  # means over all P eigenvalues, zeros included
    print(f"mean {stats['mean']:.3e} (= tr F / P = {fl.fisher_trace(model, data, lik) / P:.3e}), "
          f"second moment {stats['second_moment']:.3e}, max {stats['max']:.4f}")
    print(f"critical learning rate of momentum-0.9 GD: {fl.critical_learning_rate(stats['max'], momentum=0.9):.3f}")


if __name__ == "__main__":
    main()
