#!/usr/bin/env bash
# Accuracy vs compression: one compressor (+ decoder adapter) per ratio, trained from scratch with the same
# recipe and wall-clock budget, then the held-out dev set answered from all-vector contexts.
#   bash scripts/device/ratio_curve.sh MINUTES SUMMARY_TOKENS...     e.g. 3.5 64 32 (512-token segments: 8x, 16x)
# Needs the corpus at $DATA/corpus.npz and the dev set at $DATA/dev.jsonl (DATA defaults to /root/data).
# Per ratio, $OUT/curve_<N>.tgz holds training_state.json, the eval report and the adapters.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; minutes=$1; shift
for n in "$@"; do
  run=/root/curve/s$n; mkdir -p $run
  python3 -m lloco_index.cli train compressor --corpus $DATA/corpus.npz --out_dir $run/ckpt --summary_tokens $n \
    --max_chunks 16 --max_minutes "$minutes" --eval_every 100000 --save_every 100000 \
    --task_mix qa:0.45,cloze:0.2,ae:0.2,lm:0.15 --seed 0 2>&1 | grep -E "step [0-9]*0 |done" | tail -4
  python3 -m lloco_index.cli eval qa $DATA/dev.jsonl --mode lloco --compressor $run/ckpt/compressor \
    --adapter $run/ckpt/decoder --batch-size 16 --out $run/qa_lloco.json 2>&1 | grep -v -E "Loading weights|it/s\]" | tail -3
  tar czf $OUT/curve_$n.tgz -C $run qa_lloco.json ckpt
done
ls -la $OUT
