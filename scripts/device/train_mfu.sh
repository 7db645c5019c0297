#!/usr/bin/env bash
# Training MFU at the paper's shape: `lloco train compressor` on a random-weight LLaMA-2-7B-shaped model with
# SmolLM2's tokenizer (scripts/random_model.py; random weights, so the losses mean nothing, the time does).
#   bash scripts/device/train_mfu.sh MINUTES NAME "TRAIN FLAGS" [NAME "TRAIN FLAGS" ...]
# Needs $DATA/corpus.npz (DATA defaults to /root/data); TOKENIZER (default smollm2-135m, which needs the model
# parts of setup.sh) may name a saved tokenizer folder instead. Step lines go to $OUT/mfu.log as they are logged, and each
# run's training_state.json (tokens/s, MFU, MFU after step 20, peak) to $OUT/mfu_<NAME>.json; the adapters
# (hundreds of MB at this shape) stay on the machine.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; minutes=$1; shift; M7=/root/m7b
[ -f $M7/config.json ] || python3 scripts/random_model.py --shape 7b --tokenizer "${TOKENIZER:-smollm2-135m}" --out $M7
while [ $# -ge 2 ]; do
  name=$1; flags=$2; shift 2; run=/root/mfu/$name
  echo "== $name: $flags" | tee -a $OUT/mfu.log
  # shellcheck disable=SC2086  # flags are meant to split
  python3 -m lloco_index.cli train compressor --base_model $M7 --corpus $DATA/corpus.npz --out_dir $run \
    --max_minutes "$minutes" --eval_every 100000 --save_every 100000 --eval_examples 1 $flags 2>&1 \
    | grep --line-buffered -E "step [0-9]+ |done|Error|Traceback|memory" | sed -u 's/.*INFO/INFO/' >> $OUT/mfu.log
  cp $run/training_state.json $OUT/mfu_$name.json
done
