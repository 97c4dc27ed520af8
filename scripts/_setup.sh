# Sourced by demo.sh and test.sh: a virtualenv in .venv with the project's stack.
# The venv sees the system's packages, so a preinstalled torch (AutoDL images) is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

# pip, with its output shown in full only when it fails
quiet_pip() {
  local log
  log=$(mktemp)
  if ! pip "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "pip $* failed (see above)" >&2
    return 1
  fi
  grep -v -e "is ignored" -e "^Requirement already satisfied" "$log" | tail -n 5 || true
  rm -f "$log"
}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "==> installing torch 2.13.0 (CPU build where a local wheel exists)"
  quiet_pip install torch==2.13.0
fi
echo "==> installing ${REQUIREMENTS:-requirements.txt} and the helpers package"
quiet_pip install -r "${REQUIREMENTS:-requirements.txt}" -e .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
