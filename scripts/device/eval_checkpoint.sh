#!/usr/bin/env bash
# Quick GPU quality check of training checkpoints beside the shipped defaults, in one run on the same data:
#   bash scripts/device/eval_checkpoint.sh NAME DIR [NAME DIR ...]      (DIR "-" = the shipped defaults)
# For each: dev QA with the best chunk as text (--expand 1), then all vectors; then the needle for each checkpoint,
# whole-document mode, with NIAH_FLAGS (default: all vectors at 1k-16k; e.g. NIAH_FLAGS="--expand 1 --lengths
# 1000 8000 32000 64000 128000"); with TOP_K=16 also the needle in retrieval mode (--top-k 16 --expand 1, 1k-128k).
# Needs $DATA/dev.jsonl and $DATA/paul_graham (DATA defaults to /root/data). Reports are packed into $OUT/eval.tgz
# as soon as each is written, so a timeout loses nothing finished.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; R=/root/eval; mkdir -p $R; pairs=("$@")
ev() { out=$1; shift; echo "+ $out: lloco eval $*"
       python3 -m lloco_index.cli eval "$@" --out $R/$out.json 2>&1 | grep -v -E "Loading weights|it/s\]|clean_up" | tail -4
       tar czf $OUT/eval.tgz -C $R .; }
weights() { [ "$1" = - ] || echo "--adapter $1/decoder --compressor $1/compressor"; }
NIAH="--haystack $DATA/paul_graham --depths 0 25 50 75 100 --modes lloco --batch-size 8"
NIAH_FLAGS=${NIAH_FLAGS:---lengths 1000 2000 4000 8000 16000}
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046  # weights() is meant to split
  ev qa_${pairs[i]}_expand1 qa $DATA/dev.jsonl --mode lloco --expand 1 --batch-size 16 $(weights ${pairs[i+1]})
  # shellcheck disable=SC2046
  ev qa_${pairs[i]}_lloco qa $DATA/dev.jsonl --mode lloco --batch-size 16 $(weights ${pairs[i+1]})
done
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046,SC2086  # weights(), NIAH and NIAH_FLAGS are meant to split
  ev niah_${pairs[i]}_lloco niah $NIAH $NIAH_FLAGS $(weights ${pairs[i+1]})
  [ -n "$TOP_K" ] || continue
  # shellcheck disable=SC2046,SC2086
  ev niah_${pairs[i]}_top${TOP_K}_expand1 niah $NIAH --lengths 1000 2000 4000 8000 16000 32000 64000 128000 \
    --top-k "$TOP_K" --expand 1 $(weights ${pairs[i+1]})
done
