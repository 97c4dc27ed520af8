#!/usr/bin/env bash
# Install everything and run the demo: the server on an offline stand-in model, called with
# the seed API and the official openai client. Extra arguments go to `python -m helpers demo`
# (e.g. --keep to go on serving on port 6006, --family bluelm).
source "$(dirname "$0")/_setup.sh"
python -m helpers demo "$@"
