#!/usr/bin/env bash
# Install, start treadle on the embedded default model, run the demo through the official
# tinker SDK, stop the server. Extra arguments go to `treadle demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/treadle demo "$@"
