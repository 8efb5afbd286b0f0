#!/usr/bin/env bash
# Install, start treadle on the embedded default model, run the demo through the official
# tinker SDK, print the console's and the OpenAI endpoint's URLs; at a terminal the server
# keeps serving until Ctrl-C, otherwise it stops. Extra arguments go to `treadle demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/treadle demo "$@"
