#!/usr/bin/env bash
# A separate venv with `transformers serve` (continuous batching) for column (d) of
# benchmarks/serving.py: our pinned transformers 4.48.3 has no such server, and the newer release
# must not replace it in the project's venv.
#
#   bash benchmarks/setup_transformers_serve.sh [VENV]      # default: .venv-hfserve in the repo
#   python benchmarks/serving.py --transformers-serve VENV/bin/python
#
# torch goes in first, pinned to the project's CPU build (2.13.0, from the local wheel where there
# is one), and stays pinned (a constraint) while transformers[serving] is installed, so pip never
# swaps it for an unpinned torch (a multi-GB CUDA build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=$(realpath -m "${1:-${HF_SERVE_VENV:-$ROOT/.venv-hfserve}}")
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.23.0  # the newest release when this was written; has `serve --continuous-batching`

quiet_pip() {
  local log
  log=$(mktemp)
  if ! "$VENV/bin/pip" "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "pip $* failed (see above)" >&2
    return 1
  fi
  grep -v -e "is ignored" -e "^Requirement already satisfied" "$log" | tail -n 3 || true
  rm -f "$log"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"  # isolated: it must not see the project's transformers
fi
echo "==> torch $TORCH_VERSION"
quiet_pip install "torch==$TORCH_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
echo "==> transformers[serving] $TRANSFORMERS_VERSION"
quiet_pip install -c "$constraints" "transformers[serving]==$TRANSFORMERS_VERSION"

export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
"$VENV/bin/transformers" serve --help | grep -q -- "--continuous-batching" \
  || { echo "transformers serve has no --continuous-batching" >&2; exit 1; }
echo "ready: python benchmarks/serving.py --transformers-serve $VENV/bin/python"
