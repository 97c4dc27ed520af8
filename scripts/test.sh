#!/usr/bin/env bash
# Install everything (CPU torch where none is installed) and run all the tests, notebooks included.
# Extra arguments go to pytest (e.g. -k formats, -x).
REQUIREMENTS=requirements-test.txt
source "$(dirname "$0")/_setup.sh"
export HF_HUB_DISABLE_PROGRESS_BARS=1
python -m pytest "$@"
