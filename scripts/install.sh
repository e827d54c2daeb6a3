#!/usr/bin/env bash
# Create .venv (if needed) and install longmoe into it, editable. Usage: scripts/install.sh [EXTRAS] (default: eval)
# torch is pinned first to the CPU build that pip finds locally; a bare `torch` requirement would pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-eval}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
.venv/bin/python -c "import longmoe, torch; print('longmoe', longmoe.__version__, '| torch', torch.__version__)"
