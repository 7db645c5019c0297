#!/usr/bin/env bash
# Compressor pretraining on the GPU; results (fp16 adapters, summary embeddings, eval log) come back as $OUT/*.tgz.
#   bash scripts/device/train_compressor.sh [--init_from DIR] [--max_minutes 8] [...TrainConfig flags]
set -eo pipefail
source scripts/device/setup.sh
mkdir -p /root/run
python3 -m lloco_index.cli train compressor --corpus "${CORPUS:-.devdata/corpus.npz}" --out_dir /root/run/ckpt "$@" 2>&1 \
  | grep -v -E "Loading weights|it/s\]" | tee $OUT/train.log
tar czf $OUT/compressor.tgz -C /root/run/ckpt compressor
tar czf $OUT/decoder.tgz -C /root/run/ckpt decoder training_state.json
ls -la $OUT
