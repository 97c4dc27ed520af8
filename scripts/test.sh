#!/usr/bin/env bash
# Install everything (CPU torch where none is installed) and run all the tests, notebooks included.
# Extra arguments go to pytest (e.g. -k formats, -x).
REQUIREMENTS=requirements-test.txt
source "$(dirname "$0")/_setup.sh"
export HF_HUB_DISABLE_PROGRESS_BARS=1
# tests/test_page.py drives Debian's chromium (Playwright never downloads a browser): install it as
# root on Debian; elsewhere, or if apt fails, those tests skip and say why
if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
  command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: tests/test_page.py will skip" >&2
fi
# tests/test_vllm.py serves stand-ins with vLLM (its CPU build) from a venv of its own, kept between
# runs in ~/.cache/llm-api-helpers/venv-vllm ($VLLM_VENV); without it those tests skip (in CI: fail)
bash scripts/setup_vllm.sh || echo "could not install vLLM: tests/test_vllm.py will skip" >&2
python -m pytest "$@"
