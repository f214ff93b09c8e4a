"""Exact-Fisher benchmark: fisherlens vs torch.func and peer libraries, on CPU.

Run with the peers' virtual environment (see ``benchmarks/run.sh``)::

    benchmarks/.venv-peers/bin/python benchmarks/bench_exact.py [--quick]

Every (workload, method) pair runs in its own fresh subprocess (``--worker``), which

1. builds the model and the batch from a fixed seed (identical in every process),
2. measures peak memory of ONE call of the method: the kernel's resident-set high-water mark
   (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the call, and the peak
   minus the resident set just before the call is reported (fallback when the reset is not
   allowed: ``resource.getrusage`` max-RSS delta),
3. times the method and one plain forward+backward pass of the same batch, interleaved, after
   warm-up, and reports the ratio of the medians,
4. saves the method's result so that the parent can compare it with fisherlens' numbers.

The parent prints a markdown table and writes it to ``benchmarks/results/exact.md``.
Peers whose import or call fails are reported as ``n/a: <reason>`` instead of aborting.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

N_BATCH = 128
THREADS = 2
SEED = 0
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "exact.md"
MARK = "@@RESULT@@"


# --------------------------------------------------------------------------- workloads


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 convolutions with BatchNorm, a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 for 3×32×32 inputs (CIFAR stem: one 3×3 convolution, no max-pool), written here because the local
    torchvision wheel does not import next to the CPU torch; BatchNorm statistics randomised (a trained network's
    running statistics are not the identity)."""
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))
    g = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class EncoderClassifier(nn.Module):
    """A 4-layer transformer encoder classifier: token and position embeddings, ``nn.TransformerEncoder`` (d = 128,
    4 heads, feed-forward 256, dropout 0, batch first), mean pooling, a linear head."""

    def __init__(self, vocab: int = 1000, T: int = 32, d: int = 128, layers: int = 4, classes: int = 10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # batch on axis 0
        return self.head(self.encoder(self.tok(ids) + self.pos(pos)).mean(1))


def make_workload(name: str):
    """Model (float32, eval mode) and a batch ``(X, Y)``, identical in every process."""
    torch.manual_seed(SEED)
    if name == "resnet18":
        model, X = resnet18(), torch.randn(32, 3, 32, 32)
        return model.float().eval(), X, torch.randint(0, 10, (32,))
    if name == "transformer":
        model, X = EncoderClassifier(), torch.randint(0, 1000, (32, 32))
        return model.float().eval(), X, torch.randint(0, 10, (32,))
    if name in ("mlp", "mlp_wide"):
        H = 128 if name == "mlp" else 784
        model = nn.Sequential(nn.Linear(784, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 10))
        X = torch.randn(N_BATCH, 784)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        )
        X = torch.randn(N_BATCH, 3, 32, 32)
    else:
        raise ValueError(name)
    Y = torch.randint(0, 10, (N_BATCH,))
    return model.float().eval(), X, Y


WORKLOADS = {
    "mlp": "MLP 784-128-128-10, X (128, 784)",
    "mlp_wide": "MLP 784-784-784-10, X (128, 784)",
    "cnn": "CNN 3x32x32 (conv16-pool-conv32-pool-fc10), X (128, 3, 32, 32)",
    "resnet18": "ResNet-18 (CIFAR stem, BatchNorm in eval mode), X (32, 3, 32, 32)",
    "transformer": "4-layer transformer encoder classifier (d 128, T 32, vocab 1000), X (32, 32) token ids",
}


# --------------------------------------------------------------------------- methods
#
# A method factory gets (model, X, Y, opts) and returns a zero-argument callable; the callable
# returns a dict with "diag" (flat tensor in named_parameters() order) and/or "trace" (float).
# All imports happen in the factory so that they are not part of the time or memory measured.


def flat_result(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def m_fwd_bwd(model, X, Y, opts):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), Y).backward()
        return {}

    return run


def _fl(kind, what, engine):
    def factory(model, X, Y, opts):
        import fisherlens as fl

        fn = fl.fisher_diag if what == "diag" else fl.fisher_trace

        def run():
            out = fn(model, (X, Y), fl.Categorical(), kind=kind, engine=engine)
            return {"diag": out} if what == "diag" else {"trace": float(out)}

        return run

    return factory


def m_func_per_sample(model, X, Y, opts):
    """torch.func vmap(grad): per-sample gradients -> empirical diag and trace."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def run():
        g = per_sample(params, X, Y)
        diag = flat_result(g[k].square().mean(0) for k in params)
        return {"diag": diag, "trace": float(diag.sum())}

    return run


def m_func_jacrev_true(model, X, Y, opts):
    """torch.func vmap(jacrev): per-sample output Jacobians -> true-Fisher diag (independent)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_one(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f_one), in_dims=(None, 0))

    def run():
        with torch.no_grad():
            pi = torch.softmax(model(X), dim=-1)[:, :, None]  # (N, C, 1)
        J = jac(params, X)
        parts = []
        for k in params:
            Jk = J[k].flatten(2)  # (N, C, P_k)
            # diag(J^T (diag(pi) - pi pi^T) J) = sum_c pi_c J_c^2 - (sum_c pi_c J_c)^2
            d = (pi * Jk.square()).sum(1) - (pi * Jk).sum(1).square()
            parts.append(d.mean(0))
        diag = torch.cat(parts)
        return {"diag": diag, "trace": float(diag.sum())}

    return run


def backpack_method(extension, reduce):
    """A BackPACK method: one backward of the mean cross-entropy under ``extension()`` (a zero-argument factory of a
    BackPACK extension); ``reduce(net, n)`` reads the per-parameter fields it leaves into the result dict."""

    def factory(model, X, Y, opts):
        from backpack import backpack, extend

        plain = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)
        if any(isinstance(m, BasicBlock) for m in model.modules()):
            net = extend(backpack_native(model))
        else:  # anything else with branches (the transformer): BackPACK's converter to a graph module
            net = extend(model, use_converter=not all(isinstance(m, plain) for m in model.modules()))
        lossf = extend(nn.CrossEntropyLoss())  # reduction="mean": the quantities carry the 1/N factor
        n = len(X)

        def run():
            net.zero_grad(set_to_none=True)
            loss = lossf(net(X), Y)
            with backpack(extension()):
                loss.backward()
            return reduce(net, n)

        return run

    return factory


def backpack_native(model: nn.Sequential) -> nn.Sequential:
    """The ResNet-18 in BackPACK's own module language, because its converter (``use_converter=True``) fails on
    torch 2.13: each residual block becomes ``Parallel(main, shortcut)`` (BackPACK's branch-and-sum container, an
    ``Identity`` shortcut where the block has none) followed by a ReLU, built from the same module objects — the
    same parameters in the same order, the same function."""
    from backpack.custom_module.branching import Parallel

    def block(b: BasicBlock) -> nn.Module:
        main = nn.Sequential(b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2)
        return nn.Sequential(Parallel(main, b.short if len(b.short) else nn.Identity()), nn.ReLU())

    net = nn.Sequential(*(block(m) if isinstance(m, BasicBlock) else m for m in model)).eval()
    if not all(p is q for p, q in zip(net.parameters(), model.parameters(), strict=True)):
        raise AssertionError("the BackPACK-native ResNet must hold the same parameters in the same order")
    return net


def diag_result(diag: torch.Tensor) -> dict:
    return {"diag": diag, "trace": float(diag.sum())}


def backpack_extension(name: str, **kwargs):
    """``backpack.extensions.<name>(**kwargs)``, imported lazily (BackPACK lives in the peers' environment only)."""

    def make():
        from backpack import extensions

        return getattr(extensions, name)(**kwargs)

    return make


m_backpack_diag_ggn = backpack_method(
    backpack_extension("DiagGGNExact"),
    lambda net, n: diag_result(flat_result(p.diag_ggn_exact for p in net.parameters())))
# grad_batch[n] is the gradient of the MEAN loss' n-th term, i.e. g_n / N
m_backpack_batch_grad = backpack_method(
    backpack_extension("BatchGrad"),
    lambda net, n: diag_result(flat_result(p.grad_batch.square().sum(0) * n for p in net.parameters())))
# batch_l2[n] = ||g_n / N||^2 per parameter tensor
m_backpack_batch_l2 = backpack_method(
    backpack_extension("BatchL2Grad"),
    lambda net, n: {"trace": float(sum(p.batch_l2.sum() for p in net.parameters())) * n})


def m_nngeometry_diag(model, X, Y, opts):
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PVector
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, Y), batch_size=len(X))
    lc = LayerCollection.from_model(model)

    def run():
        fim = FIM(model, loader, PMatDiag, variant="classif_logits", device="cpu",
                  layer_collection=lc)
        per_layer = PVector(lc, vector_repr=fim.get_diag()).to_dict()
        parts = []
        for name, _ in model.named_parameters():
            layer, _, which = name.rpartition(".")
            parts.append(per_layer[layer][0 if which == "weight" else 1])
        diag = flat_result(parts)
        return {"diag": diag, "trace": float(diag.sum())}

    return run


def _curvlinops_trace(op_name):
    def factory(model, X, Y, opts):
        import curvlinops

        op_cls = getattr(curvlinops, op_name)
        params = [p for p in model.parameters() if p.requires_grad]
        k = opts["matvecs"]

        def run():
            torch.manual_seed(1)
            op = op_cls(model, nn.CrossEntropyLoss(), params, [(X, Y)], check_deterministic=False)
            return {"trace": float(curvlinops.hutchinson_trace(op, num_matvecs=k))}

        return run

    return factory


def m_pyhessian_trace(model, X, Y, opts):
    import numpy as np
    from pyhessian import hessian

    k = opts["matvecs"]

    def run():
        torch.manual_seed(1)
        h = hessian(model, nn.CrossEntropyLoss(), data=(X, Y), cuda=False)
        return {"trace": float(np.mean(h.trace(maxIter=k, tol=1e-3)))}

    return run


# key -> (label, quantity, factory, reference quantity in fisherlens' numbers or None)
METHODS = {
    "fwd_bwd": ("fwd+bwd (cross-entropy, loss.backward())", "baseline", m_fwd_bwd, None),
    "fl_diag_true": ("fisherlens fisher_diag(kind='true')", "true diag (exact)",
                     _fl("true", "diag", "auto"), "diag_true"),
    "fl_trace_true": ("fisherlens fisher_trace(kind='true')", "true trace (exact)",
                      _fl("true", "trace", "auto"), "trace_true"),
    "fl_trace_emp": ("fisherlens fisher_trace(kind='empirical')", "empirical trace (exact)",
                     _fl("empirical", "trace", "auto"), "trace_emp"),
    "fl_diag_true_func": ("fisherlens fisher_diag(kind='true', engine='functional')",
                          "true diag (exact)", _fl("true", "diag", "functional"), "diag_true"),
    "fl_trace_emp_func": ("fisherlens fisher_trace(kind='empirical', engine='functional')",
                          "empirical trace (exact)", _fl("empirical", "trace", "functional"),
                          "trace_emp"),
    "func_vmap_grad": ("torch.func vmap(grad) per-sample grads", "empirical diag+trace (exact)",
                       m_func_per_sample, "diag_emp"),
    "func_vmap_jacrev": ("torch.func vmap(jacrev) per-sample Jacobians", "true diag (exact)",
                         m_func_jacrev_true, "diag_true"),
    "backpack_diag_ggn": ("BackPACK DiagGGNExact", "true diag (exact GGN = Fisher for CE)",
                          m_backpack_diag_ggn, "diag_true"),
    "backpack_batch_grad": ("BackPACK BatchGrad", "empirical diag+trace (exact)",
                            m_backpack_batch_grad, "diag_emp"),
    "backpack_batch_l2": ("BackPACK BatchL2Grad", "empirical trace (exact)",
                          m_backpack_batch_l2, "trace_emp"),
    "nngeometry_diag": ("nngeometry FIM(PMatDiag)", "true diag (exact)",
                        m_nngeometry_diag, "diag_true"),
    "curvlinops_ggn_trace": ("curvlinops GGNLinearOperator + hutchinson_trace",
                             "true trace (Hutchinson, {k} matvecs)",
                             _curvlinops_trace("GGNLinearOperator"), "trace_true"),
    "curvlinops_ef_trace": ("curvlinops EFLinearOperator + hutchinson_trace",
                            "empirical trace (Hutchinson, {k} matvecs)",
                            _curvlinops_trace("EFLinearOperator"), "trace_emp"),
    "pyhessian_trace": ("PyHessian hessian.trace", "HESSIAN trace (Hutchinson, <= {k} iters)",
                        m_pyhessian_trace, None),
}
STOCHASTIC = {"curvlinops_ggn_trace", "curvlinops_ef_trace", "pyhessian_trace"}


# --------------------------------------------------------------------------- worker side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def trim_result() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_peak(fn) -> float:
    """Peak of live tensor bytes (torch's CPU allocator) during one call of ``fn``, above the level before, MiB."""
    from torch.profiler import ProfilerActivity, profile

    trim_result()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def measure_peak(fn):
    """Run ``fn`` once; return (result, peak resident memory above the pre-call level in MiB, how)."""
    trim_result()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the VmHWM high-water mark (Linux >= 4.0)
        before = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        how = "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss"
    return out, max(peak - before, 0) / 1024.0, how


def _sample(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _inner_loops(fn, target: float = 0.05) -> int:
    t = _sample(fn, 1)
    return max(1, min(1000, math.ceil(target / max(t, 1e-7))))


def warm_up(run, base, opts: dict) -> None:
    for _ in range(opts["warmup"]):
        run()
        base()


def time_interleaved(run, base, opts: dict) -> tuple[list[float], list[float]]:
    """Time ``run`` and the baseline ``base`` alternately (drifts hit both alike): seconds per call, per repeat."""
    inner_m, inner_b = _inner_loops(run), _inner_loops(base)
    t_m, t_b = [], []
    for _ in range(opts["repeats"]):
        t_b.append(_sample(base, inner_b))
        t_m.append(_sample(run, inner_m))
    return t_m, t_b


def worker(workload: str, method: str, opts: dict, out_path: str) -> dict:
    torch.set_num_threads(opts.get("threads", THREADS))
    model, X, Y = make_workload(workload)
    label, quantity, factory, _ = METHODS[method]
    run = factory(model, X, Y, opts)
    result, mem_mib, mem_how = measure_peak(run)
    base = m_fwd_bwd(*make_workload(workload), opts)
    warm_up(run, base, opts)
    t_m, t_b = time_interleaved(run, base, opts)
    torch.save(result, out_path)
    return {
        "time_s": statistics.median(t_m), "base_s": statistics.median(t_b),
        "time_min": min(t_m), "base_min": min(t_b),
        "time_all": t_m, "base_all": t_b, "mem_mib": mem_mib, "mem_how": mem_how,
        "tensor_mib": tensor_peak(run),
    }


def worker_main(args, worker) -> int:
    """The ``--worker WORKLOAD METHOD OUT`` side of a benchmark script: run ``worker`` and print its payload
    (or the error, reported as n/a by the parent) behind :data:`MARK`."""
    workload, method, out_path = args.worker
    try:
        payload = worker(workload, method, json.loads(args.opts), out_path)
    except Exception as exc:
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
        payload = {"error": msg[:200]}
    print(MARK + json.dumps(payload), flush=True)
    return 0


# --------------------------------------------------------------------------- parent side


def cpu_busy(window: float = 1.0) -> float:
    """Fraction of all CPUs busy (any process) over ``window`` seconds, from /proc/stat."""

    def snap():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total

    try:
        i0, t0 = snap()
        time.sleep(window)
        i1, t1 = snap()
    except (OSError, IndexError, ValueError):
        return float("nan")
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the CPUs idle; return busy share."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def spawn(workload: str, method: str, opts: dict, tmpdir: str, timeout: float, *, script: str = __file__,
          threads: int | None = None, env: dict | None = None):
    """Run ``script --worker workload method`` in a fresh process: ``(payload, result, None)`` or
    ``(None, None, "n/a: why")``."""
    out_path = os.path.join(tmpdir, f"{workload}-{method}.pt")
    th = str(threads if threads is not None else opts.get("threads", THREADS))
    env = dict(os.environ, OMP_NUM_THREADS=th, MKL_NUM_THREADS=th, **(env or {}))
    cmd = [sys.executable, script, "--worker", workload, method, out_path, "--opts", json.dumps(opts)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, None, f"n/a: timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            payload = json.loads(line[len(MARK):])
            if "error" in payload:
                return None, None, "n/a: " + payload["error"]
            return payload, torch.load(out_path), None
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, None, f"n/a: worker exited {proc.returncode}: {tail[0][:160]}"


def reference(workload: str) -> dict:
    """fisherlens' own numbers (functional and auto engines must agree; auto is the reference)."""
    import fisherlens as fl

    torch.set_num_threads(THREADS)
    model, X, Y = make_workload(workload)
    cat, data = fl.Categorical(), (X, Y)
    ref = {
        "diag_true": fl.fisher_diag(model, data, cat, kind="true"),
        "diag_emp": fl.fisher_diag(model, data, cat, kind="empirical"),
        "trace_true": float(fl.fisher_trace(model, data, cat, kind="true")),
        "trace_emp": float(fl.fisher_trace(model, data, cat, kind="empirical")),
    }
    return ref


def agreement(result: dict, ref: dict | None, ref_key: str | None) -> str:
    if ref_key is None:
        return "—"
    if ref is None:
        return "n/a: fisherlens reference unavailable"
    target = ref[ref_key]
    msgs = []
    if ref_key.startswith("diag") and "diag" in result:
        d = result["diag"].double()
        t = target.double()
        if d.shape != t.shape:
            return f"shape mismatch {tuple(d.shape)} vs ours {tuple(t.shape)}"
        rel = float((d - t).norm() / t.norm())
        msgs.append(f"diag rel. L2 err {rel:.1e}")
        tr_key = ref_key.replace("diag", "trace")
        tr = ref[tr_key]
        msgs.append(f"trace rel. err {abs(float(d.sum()) - tr) / abs(tr):.1e}")
    elif "trace" in result:
        tr = float(target.sum()) if isinstance(target, torch.Tensor) else target
        msgs.append(f"trace rel. err {abs(result['trace'] - tr) / abs(tr):.1e}")
    return "; ".join(msgs)


def value_of(result: dict) -> float | None:
    if "trace" in result:
        return result["trace"]
    if "diag" in result:
        return float(result["diag"].sum())
    return None


def fmt_value(v) -> str:
    return "—" if v is None else f"{v:.6g}"


def versions() -> str:
    import importlib.metadata as md

    names = ["fisherlens", "torch", "backpack-for-pytorch", "nngeometry",
             "curvlinops-for-pytorch", "pyhessian"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def harness_args(ap: argparse.ArgumentParser, *, out: Path, json: Path | None = None, timeout: float = 1200.0,
                 wait_idle: float | None = 300.0, wait_note: str = "", malloc: bool = True) -> None:
    """The options of the worker harness that every benchmark shares: ``--repeats``, ``--timeout``, ``--wait-idle``,
    ``--malloc`` (with ``malloc``), ``--out``, ``--json`` (when given a default path) and the hidden ``--worker`` /
    ``--opts`` of the subprocesses (:func:`worker_main`)."""
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per worker")
    ap.add_argument("--wait-idle", type=float, default=wait_idle,
                    help="before each worker, wait up to this many seconds for the CPUs to be idle (other processes "
                    f"make multi-threaded timings meaningless){wait_note}; 0 disables")
    if malloc:
        ap.add_argument("--malloc", choices=["stable", "default"], default="stable",
                        help="'stable' (default) runs the workers with glibc malloc settings that keep freed memory "
                        "mapped (no page faults on repeated allocations, reproducible times); 'default' leaves glibc "
                        "alone")
    ap.add_argument("--out", type=Path, default=out, help="markdown table")
    if json is not None:
        ap.add_argument("--json", type=Path, default=json, help="all numbers as JSON")
    ap.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "METHOD", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and matvecs (smoke test)")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--matvecs", type=int, default=None,
                    help="Hutchinson matvecs for curvlinops / max iterations for PyHessian")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads (2)")
    harness_args(ap, out=RESULTS, malloc=False)
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(args, worker)

    opts = {
        "repeats": args.repeats or (3 if args.quick else 7),
        "warmup": 1 if args.quick else 2,
        "matvecs": args.matvecs or (20 if args.quick else 100),
        "threads": args.threads,
    }
    torch.set_num_threads(args.threads)
    lines = [
        "# Exact Fisher benchmark (CPU)",
        "",
        f"- batch N = {N_BATCH} (32 for resnet18 and transformer), float32, `torch.set_num_threads({args.threads})`, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        f"- {versions()}",
        f"- time: median of {opts['repeats']} repeats after {opts['warmup']} warm-up call(s), "
        "divided by the median of a plain forward+backward pass timed interleaved in the same "
        "process; in parentheses the ratio of the fastest samples (less sensitive to other load)",
        "- peak ΔRSS: resident-set high-water mark of ONE call in a fresh process, minus the "
        "resident set just before the call (MiB; includes one-time set-up such as first-call caches)",
        "- tensor peak: the most tensor bytes (torch's CPU allocator) live at once during one warm call, above "
        "the level before it (MiB)",
        "- agreement: relative error against fisherlens' own result for the same quantity "
        "(mean over the batch)",
        "",
    ]
    print("\n".join(lines), flush=True)
    header = ["workload", "method", "computes", "time / fwd+bwd (min)", "peak ΔRSS (MiB)", "tensor peak (MiB)",
              "value (trace)", "agreement with ours"]
    rows, busy_seen = [], []
    with tempfile.TemporaryDirectory(prefix="fisherlens-bench-") as tmpdir:
        for wl in args.workloads:
            model, _, _ = make_workload(wl)
            n_params = sum(p.numel() for p in model.parameters())
            try:
                ref = reference(wl)
                ref_note = (f"ours: tr F_true = {ref['trace_true']:.6g}, "
                            f"tr F_emp = {ref['trace_emp']:.6g}")
            except Exception as exc:
                ref, ref_note = None, f"fisherlens reference unavailable: {exc}"
            print(f"[{wl}] P = {n_params}; {ref_note}", flush=True)
            base_ms = []
            for m in args.methods:
                label, quantity, _, ref_key = METHODS[m]
                quantity = quantity.format(k=opts["matvecs"])
                busy = wait_quiet(args.wait_idle)
                busy_seen.append(busy)
                t0 = time.perf_counter()
                payload, result, err = spawn(wl, m, opts, tmpdir, args.timeout)
                if err is not None:
                    row = [wl, label, quantity, err, "—", "—", "—", "—"]
                else:
                    base_ms.append(payload["base_s"] * 1e3)
                    ratio = payload["time_s"] / payload["base_s"]
                    ratio_min = payload["time_min"] / payload["base_min"]
                    agree = agreement(result, ref, ref_key)
                    if m in STOCHASTIC and ref_key:
                        agree += " (stochastic estimate)"
                    if m == "pyhessian_trace":
                        agree = "not comparable: Hessian, not Fisher"
                    flag = " †" if busy > 0.15 else ""
                    row = [wl, label, quantity, f"{ratio:.2f}{flag} ({ratio_min:.2f})", f"{payload['mem_mib']:.1f}",
                           f"{payload['tensor_mib']:.1f}", fmt_value(value_of(result)), agree]
                rows.append(row)
                print(f"  {m:<22} {time.perf_counter() - t0:6.1f}s  " + " | ".join(row[3:]),
                      flush=True)
            if base_ms:
                lines.append(f"- {wl}: {WORKLOADS[wl]}, P = {n_params:,} parameters, "
                             f"fwd+bwd = {statistics.median(base_ms):.2f} ms")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return emit(lines, busy_seen, args.out)


def emit(lines: list[str], busy_seen: list[float], out: Path) -> int:
    """Print the markdown report (with a † note when measurements started on busy CPUs) and write it to ``out``."""
    contended = sum(b > 0.15 for b in busy_seen)
    if contended:
        lines = [*lines, "", f"† {contended} measurement(s) started while other processes kept the CPUs busy "
                 f"(> 15 %, max {max(busy_seen):.0%}); their times are not reliable — re-run on an idle machine."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
