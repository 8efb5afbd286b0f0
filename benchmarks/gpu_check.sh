#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) as a lent GPU machine runs it: offline, under
# 10 minutes, its JSON lines kept in gpu_check.jsonl (under $OUT when the runner sets it).
# Extra arguments go to the script, e.g. `benchmarks/gpu_check.sh --steps 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.jsonl"
export HF_HUB_OFFLINE=1
timeout 570 "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@" | tee "$out"
