#!/usr/bin/env bash
# Retrieval-mode QA on the GPU, each dev set's base-model baselines measured in the same call:
#   DATA=.devdata bash scripts/device/eval_topk.sh dev.jsonl dev_seed1.jsonl ...   (KS="2 3", default)
# For each dev set (run side by side): the base model with the full text and with the top-K text chunks (BM25,
# K = each of $KS), then the shipped defaults (or $WEIGHTS, a checkpoint folder) with all vectors and with the
# top-K compressed chunks (`lloco eval qa --mode lloco --top-k K`, the path of `lloco answer --context F --top-k K`).
# TEXT_ADAPTER=1 also gives the full text and the top-K text chunks to the shipped decoder adapter (<set>_full_adapter,
# <set>_ragK_adapter): what the adapter alone does, without compression.
# Reports <set>_<mode>.json are packed into $OUT/eval_<set>.tgz as each set finishes.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; R=/root/eval; KS=${KS:-"2 3"}
W=(); [ -n "$WEIGHTS" ] && W=(--adapter "$WEIGHTS/decoder" --compressor "$WEIGHTS/compressor")
ev() { out=$1; shift; python3 -m lloco_index.cli eval qa "$@" --batch-size 16 --out $dir/$out.json 2>&1 |
       grep -v -E "Loading weights|it/s\]|clean_up" | tail -2 | sed "s|^|$out: |"; }
one() { dev=$DATA/$1; s=$(basename "$1" .jsonl); dir=$R/$s; mkdir -p "$dir"
  ev ${s}_full_base "$dev" --mode full --adapter base
  for k in $KS; do ev ${s}_rag${k}_base "$dev" --mode rag --top-k "$k" --adapter base; done
  if [ -n "$TEXT_ADAPTER" ]; then
    ev ${s}_full_adapter "$dev" --mode full "${W[@]}"
    for k in $KS; do ev ${s}_rag${k}_adapter "$dev" --mode rag --top-k "$k" "${W[@]}"; done
  fi
  ev ${s}_lloco "$dev" --mode lloco "${W[@]}"
  for k in $KS; do ev ${s}_lloco_top${k} "$dev" --mode lloco --top-k "$k" "${W[@]}"; done
  tar czf "$OUT/eval_$s.tgz" -C "$dir" .; }
for f in "$@"; do one "$f" & done
wait
