#!/usr/bin/env bash
# Where the re-expanded chunk goes (--expand-at end | in-place), measured in one GPU run on the same data:
#   bash scripts/device/eval_expand_at.sh [NAME DIR ...]     (extra checkpoints, run with --expand-at end only)
# Shipped defaults: needle, whole document, --expand 1, both placements (8 lengths x 5 depths); needle with
# --top-k 16 --expand 1, both placements; dev QA with --expand 1, both placements. Needs $DATA/dev.jsonl and
# $DATA/paul_graham (DATA defaults to .devdata). Reports are packed into $OUT/expand_at.tgz after each command.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-.devdata}; R=/root/expand_at; mkdir -p $R; pairs=("$@")
ev() { out=$1; shift; echo "+ $out: lloco eval $*"
       python3 -m lloco_index.cli eval "$@" --out $R/$out.json 2>&1 | grep -v -E "Loading weights|it/s\]|clean_up" | tail -3
       tar czf $OUT/expand_at.tgz -C $R .; }
H="--haystack $DATA/paul_graham --lengths 1000 2000 4000 8000 16000 32000 64000 128000 --depths 0 25 50 75 100"
H="$H --modes lloco --batch-size 8"
# shellcheck disable=SC2086  # H is meant to split
for at in end in-place; do
  ev niah_expand1_${at} niah $H --expand 1 --expand-at $at
  ev qa_expand1_${at} qa $DATA/dev.jsonl --mode lloco --expand 1 --expand-at $at --batch-size 16
done
for at in end in-place; do
  # shellcheck disable=SC2086
  ev niah_top16_expand1_${at} niah $H --top-k 16 --expand 1 --expand-at $at
done
for ((i = 0; i < ${#pairs[@]}; i += 2)); do
  w="--adapter ${pairs[i+1]}/decoder --compressor ${pairs[i+1]}/compressor"
  # shellcheck disable=SC2086
  ev niah_${pairs[i]}_expand1_end niah $H --expand 1 $w
  # shellcheck disable=SC2086
  ev qa_${pairs[i]}_expand1_end qa $DATA/dev.jsonl --mode lloco --expand 1 --batch-size 16 $w
done
