#!/usr/bin/env bash
# Quality evaluation of the shipped defaults on the GPU (same commands run on CPU, only slower).
# Needs $DATA/paul_graham (the haystack essays) and $DATA/dev.jsonl (from `lloco eval make-dev`); DATA defaults to .devdata.
set -o pipefail
source scripts/device/setup.sh
L="1000 2000 4000 8000 16000 32000 64000 128000"; D="0 25 50 75 100"
DATA=${DATA:-.devdata}; R=/root/eval; mkdir -p $R
# results land in $R and are re-packed into $OUT/eval.tgz after every command, so a timeout loses nothing finished
run() { echo "+ lloco $*"; python3 -m lloco_index.cli "$@" 2>&1 | grep -v -E "Loading weights|it/s\]|clean_up" | tail -6
        tar czf $OUT/eval.tgz -C $R .; }
H="--haystack $DATA/paul_graham --lengths $L --depths $D --batch-size 8"
run eval niah $H --modes lloco --out $R/niah_lloco.json
run eval niah $H --modes lloco --expand 1 --out $R/niah_lloco_expand1.json
run eval niah $H --modes full --adapter base --out $R/niah_full_base.json
for m in lloco; do run eval qa $DATA/dev.jsonl --mode $m --out $R/qa_lloco.json --batch-size 16; done
run eval qa $DATA/dev.jsonl --mode lloco --expand 1 --out $R/qa_lloco_expand1.json --batch-size 16
for m in full rag none; do run eval qa $DATA/dev.jsonl --mode $m --adapter base --out $R/qa_${m}_base.json --batch-size 16; done
run eval qa $DATA/dev.jsonl --mode full --out $R/qa_full_adapter.json --batch-size 16
ls -la $R
