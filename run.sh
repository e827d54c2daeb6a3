#!/usr/bin/env bash
# Install longmoe into .venv, then run its demo: the bundled model (trained by recipes/bundled) finds a planted
# sentence in haystacks of 1K to 128K tokens on this CPU, prints recall by length x depth and writes a heatmap.
#   ./run.sh                                  the demo (a few minutes on 2 CPU cores)
#   ./run.sh --max-length 1048576             any `longmoe demo` option: a million tokens, --haystack FILE, ...
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/longmoe demo "$@"
