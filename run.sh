#!/usr/bin/env bash
# Install longmoe into .venv, then run it.
#   ./run.sh                         a tiny random-weight demo model (built locally, no downloads)
#   ./run.sh MODEL_DIR ["PROMPT"]    any supported transformers-format checkpoint directory
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
model=${1:-}
prompt=${2:-"The special magic number is"}
if [ -z "$model" ]; then
    model=demo-model
    [ -f "$model/config.json" ] || .venv/bin/python scripts/make_demo_model.py "$model"
fi
.venv/bin/longmoe info --model "$model"
echo "--- generate: $prompt" >&2
.venv/bin/longmoe generate --model "$model" --prompt "$prompt" --max-new-tokens 48
echo
