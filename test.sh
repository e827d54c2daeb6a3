#!/usr/bin/env bash
# Install longmoe with its test dependencies into .venv, then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh eval,test
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
