#!/usr/bin/env bash
# Create (once) the peers' virtual environment benchmarks/.venv-peers and run the benchmarks.
#
#   benchmarks/run.sh            # full run, writes benchmarks/results/exact.md
#   benchmarks/run.sh --quick    # smoke test; any arguments are passed to bench_exact.py
#   benchmarks/run.sh bench_other.py [ARGS]   # run another benchmarks/bench_*.py in the same venv
#   benchmarks/run.sh bench_lm.py [--quick]   # e.g. the causal-LM benchmark (results/lm.md, results/lm.json)
#   benchmarks/run.sh bench_natural.py [--quick]   # natural-gradient step vs SGD step, K-FAC, Gram/CG crossover
#
# torch is installed FIRST and pinned (torch==2.13.0, the local CPU wheel) and every later install
# is constrained to it: an unpinned torch would pull several GB of CUDA wheels, and the peers'
# requirement "torch>=..." would otherwise upgrade it. Idempotent: a complete venv is reused.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${PEERS_VENV:-$HERE/.venv-peers}"
PY="$VENV/bin/python"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PEERS=(backpack-for-pytorch "nngeometry==0.4" curvlinops-for-pytorch pyhessian)
# the stamp names the runtime set below: a venv made for an older set is completed on the next run
RUNTIME=(numpy scipy matplotlib tqdm mpmath threadpoolctl)
STAMP="$VENV/.fisherlens-bench-ready-2"

if [[ ! -f "$STAMP" ]]; then
    if [[ ! -x "$PY" ]]; then
        echo ">> creating $VENV"
        python3 -m venv "$VENV"
    fi
    CONSTRAINTS="$VENV/constraints.txt"
    echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
    echo ">> installing torch==$TORCH_VERSION first"
    "$VENV/bin/pip" install "torch==$TORCH_VERSION"
    echo ">> installing ${RUNTIME[*]} and fisherlens (editable, no deps)"
    "$VENV/bin/pip" install -c "$CONSTRAINTS" "${RUNTIME[@]}"
    "$VENV/bin/pip" install -c "$CONSTRAINTS" --no-deps -e "$ROOT"
    # Peers one by one, so that one failing to install does not block the others
    # (the benchmark reports a missing peer as "n/a").
    for peer in "${PEERS[@]}"; do
        echo ">> installing $peer"
        "$VENV/bin/pip" install -c "$CONSTRAINTS" "$peer" \
            || echo "!! could not install $peer; the benchmark will report it as n/a"
    done
    "$PY" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
    touch "$STAMP"
fi

SCRIPT="bench_exact.py"
if [[ "${1:-}" == bench_*.py ]]; then
    SCRIPT="$1"
    shift
fi
cd "$ROOT"
"$PY" "$HERE/$SCRIPT" "$@"
