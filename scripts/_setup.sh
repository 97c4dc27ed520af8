# Sourced by demo.sh and test.sh: a virtualenv in .venv with the project's stack.
# The venv sees the system's packages, so a preinstalled torch (AutoDL images) is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "==> installing torch 2.13.0 (CPU build where a local wheel exists)"
  pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
fi
echo "==> installing ${REQUIREMENTS:-requirements.txt} and the helpers package"
pip install -q -r "${REQUIREMENTS:-requirements.txt}" -e . 2>&1 | grep -v "is ignored" || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
