#!/usr/bin/env bash
# `lloco bench` on the GPU: one process, one GPU, an estimated 4-6 minutes (it starts nothing new after 450 s).
# bench.json (rewritten after every section) and bench.log come back in $OUT.
#   bash scripts/device/bench.sh [extra `lloco bench` flags]
# The default-model rows need the carried SmolLM2 GGUF (see setup.sh); without it only the 7B shape runs.
set -o pipefail
shapes=7b
if [ -f /root/m/model.gguf ] || [ -f /root/m/part3 ]; then
  source scripts/device/setup.sh && shapes=7b,default
else
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -m lloco_index.cli bench --model-shape "$shapes" --out "$OUT/bench.json" "$@" 2>&1 \
  | grep -v -E "Loading weights|it/s\]" | tee "$OUT/bench.log"
