#!/usr/bin/env bash
# The end-to-end chain on the real data in ../shared/data (extended as stages land).
set -euo pipefail
PY=${PY:-.venv/bin/python}
echo "demo: nothing to run yet"
