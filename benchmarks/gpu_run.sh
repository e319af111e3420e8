#!/usr/bin/env bash
# Every GPU figure of the README in one call on a lent GPU machine (about 5 minutes on one H200):
# every splice path against plain autograd on the GPU (benchmarks/gpu_equality.py), `isaerft audit` on the GPU against
# --use-cpu (benchmarks/gpu_audit.py), the speed benchmark's gemma-2-2b
# preset and the FSDP recipe (train under `accelerate launch` with FSDP, save,
# reload in a fresh process, compare). Results go to $OUT (default: benchmarks/results/gpu).
# The machine has torch, transformers' dependencies and accelerate but no sae-lens and no registry: the wheels come
# from ../shared/gpu/wheelhouse.sh, built into .whl beside this checkout.
#   bash benchmarks/gpu_run.sh          (on the GPU machine, from the checkout)
#   QUICK=1 bash benchmarks/gpu_run.sh  (tiny shapes, to check the script on a CPU; skips the FSDP launch)
#   FSDP=0 bash benchmarks/gpu_run.sh   (the equality check and the speed preset only)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import sae_lens" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD/.whl/shim:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, sae_lens, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'sae-lens', sae_lens.__version__, 'accelerate', accelerate.__version__)"
quick=${QUICK:+--quick}
timeout 240 python3 benchmarks/gpu_equality.py $quick --output "$OUT/equality.json" 2>&1 \
  | grep -v -E "FutureWarning|warnings.warn" | tee "$OUT/equality.log"
timeout 240 python3 benchmarks/gpu_audit.py $quick --output "$OUT/audit.json" 2>&1 \
  | grep -v -E "FutureWarning|warnings.warn" | tee "$OUT/audit.log"
timeout 480 python3 benchmarks/speed.py --preset gemma-2-2b $quick --output "$OUT/speed_gemma-2-2b.json" 2>&1 \
  | grep -v -E "FutureWarning|warnings.warn" | tee "$OUT/preset.log"
if [ -z "${QUICK:-}" ] && [ "${FSDP:-1}" != 0 ]; then
  fsdp=$(mktemp -d)
  timeout 240 python3 -m accelerate.commands.launch --num_processes 1 --use_fsdp \
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
    --fsdp_use_orig_params true --fsdp_state_dict_type SHARDED_STATE_DICT --mixed_precision no \
    benchmarks/fsdp_check.py train "$fsdp" > "$OUT/fsdp.log" 2>&1
  echo "fsdp train exit $?" | tee -a "$OUT/fsdp.log"
  tail -5 "$OUT/fsdp.log"
  timeout 120 python3 benchmarks/fsdp_check.py check "$fsdp" 2>&1 | grep -v -E "FutureWarning|warnings.warn" \
    | tee "$OUT/fsdp.json"
fi
