#!/usr/bin/env bash
# Quick GPU quality check of training checkpoints beside the shipped defaults, in one run on the same data:
#   bash scripts/device/eval_checkpoint.sh NAME DIR [NAME DIR ...]      (DIR "-" = the shipped defaults)
# For each: dev QA with the best chunk as text (--expand 1), then all vectors; then the needle for each checkpoint,
# whole-document mode, with NIAH_FLAGS (default: all vectors at 1k-16k; e.g. NIAH_FLAGS="--expand 1 --lengths
# 1000 8000 32000 64000 128000"); with TOP_K=16 also the needle in retrieval mode (--top-k 16 --expand 1, 1k-128k).
# NIAH_FLAGS=- skips the needle. BASELINES=1 first runs the base model on $DEV with the full text, the top-5 text
# chunks and no context (the issue's baselines, measured in the same call). Needs $DATA/paul_graham and a dev set, $DEV (default $DATA/dev.jsonl); reports of
# another DEV than the default are named qa_s<seed>_* (the seed from the file name: dev_seed1.jsonl -> s1).
# DATA defaults to /root/data. Reports are packed into $OUT/eval.tgz
# as soon as each is written, so a timeout loses nothing finished.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; R=/root/eval; mkdir -p $R; pairs=("$@"); DEV=${DEV:-$DATA/dev.jsonl}
tag=qa; [ "$DEV" = "$DATA/dev.jsonl" ] || tag=qa_s$(basename "$DEV" .jsonl | tr -dc 0-9)
ev() { out=$1; shift; echo "+ $out: lloco eval $*"
       python3 -m lloco_index.cli eval "$@" --out $R/$out.json 2>&1 | grep -v -E "Loading weights|it/s\]|clean_up" | tail -4
       tar czf $OUT/eval.tgz -C $R .; }
weights() { [ "$1" = - ] || echo "--adapter $1/decoder --compressor $1/compressor"; }
NIAH="--haystack $DATA/paul_graham --depths 0 25 50 75 100 --modes lloco --batch-size 8"
NIAH_FLAGS=${NIAH_FLAGS:---lengths 1000 2000 4000 8000 16000}
if [ -n "$BASELINES" ]; then
  for m in full rag none; do ev ${tag}_${m}_base qa $DEV --mode $m --adapter base --batch-size 16; done
fi
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046  # weights() is meant to split
  ev ${tag}_${pairs[i]}_expand1 qa $DEV --mode lloco --expand 1 --batch-size 16 $(weights ${pairs[i+1]})
  # shellcheck disable=SC2046
  ev ${tag}_${pairs[i]}_lloco qa $DEV --mode lloco --batch-size 16 $(weights ${pairs[i+1]})
done
[ "$NIAH_FLAGS" = - ] && exit 0
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  # shellcheck disable=SC2046,SC2086  # weights(), NIAH and NIAH_FLAGS are meant to split
  ev niah_${pairs[i]}_lloco niah $NIAH $NIAH_FLAGS $(weights ${pairs[i+1]})
  [ -n "$TOP_K" ] || continue
  # shellcheck disable=SC2046,SC2086
  ev niah_${pairs[i]}_top${TOP_K}_expand1 niah $NIAH --lengths 1000 2000 4000 8000 16000 32000 64000 128000 \
    --top-k "$TOP_K" --expand 1 $(weights ${pairs[i+1]})
done
