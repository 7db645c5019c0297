#!/usr/bin/env bash
# Quick GPU quality check of training checkpoints beside the shipped defaults, in one run on the same data:
#   bash scripts/device/eval_checkpoint.sh NAME DIR [NAME DIR ...]      (DIR "-" = the shipped defaults)
# For each: dev QA with the best chunk as text (--expand 1), then all vectors; then the needle for each checkpoint,
# whole-document mode, with NIAH_FLAGS (default: all vectors at 1k-16k; e.g. NIAH_FLAGS="--expand 1 --lengths
# 1000 8000 32000 64000 128000"). Needs $DATA/dev.jsonl and $DATA/paul_graham (DATA defaults to /root/data).
# Each report is copied to $OUT as soon as it is written, so a timeout loses nothing finished.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; R=/root/eval; mkdir -p $R; pairs=("$@")
ev() { out=$1; shift; echo "+ $out: lloco eval $*"
       python3 -m lloco_index.cli eval "$@" --out $R/$out.json 2>&1 | grep -v -E "Loading weights|it/s\]|clean_up" | tail -4
       cp $R/$out.json $OUT/; }
weights() { [ "$1" = - ] || echo "--adapter $1/decoder --compressor $1/compressor"; }
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046  # weights() is meant to split
  ev qa_${pairs[i]}_expand1 qa $DATA/dev.jsonl --mode lloco --expand 1 --batch-size 16 $(weights ${pairs[i+1]})
done
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  [ "${pairs[i+1]}" = - ] && continue  # the shipped defaults' all-vector score is in docs/quality.md
  # shellcheck disable=SC2046
  ev qa_${pairs[i]}_lloco qa $DATA/dev.jsonl --mode lloco --batch-size 16 $(weights ${pairs[i+1]})
done
NIAH_FLAGS=${NIAH_FLAGS:---lengths 1000 2000 4000 8000 16000}
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046,SC2086  # weights() and NIAH_FLAGS are meant to split
  ev niah_${pairs[i]}_lloco niah --haystack $DATA/paul_graham --depths 0 25 50 75 100 --modes lloco --batch-size 8 \
    $NIAH_FLAGS $(weights ${pairs[i+1]})
done
