#!/usr/bin/env bash
# Do the vectors carry the text? Short from-scratch compressor runs, each followed by the vector ablation
# (own vectors vs another example's vs none, teacher-forced; scripts/vector_ablation.py) on qa and ae.
#   bash scripts/device/vector_gate.sh MINUTES NAME "TRAIN FLAGS" [NAME "TRAIN FLAGS" ...]
# Needs the corpus at $DATA/corpus.npz (DATA defaults to /root/data); TASKS (default "qa ae") picks the ablations
# (TASKS="" for throughput runs: the log lines give tokens/s and MFU of the last 20 steps, and of the run). Per run, $OUT/gate_<NAME>.tgz holds
# the adapters, training_state.json, the training log and the ablation JSONs; step lines land in $OUT/gate.log as
# they are logged, then the ablation summaries.
# A later run can continue an earlier one of the same call batch: --init_from /root/gate/<NAME>/ckpt.
# Runs of one call can share the GPU (a QA run peaks at ~7 GiB and trains at a few % MFU): start one script per run
# with & and wait; the step lines carry the run's name.
set -o pipefail
source scripts/device/setup.sh
DATA=${DATA:-/root/data}; minutes=$1; shift; TASKS=${TASKS-qa ae}
while [ $# -ge 2 ]; do
  name=$1; flags=$2; shift 2; run=/root/gate/$name; mkdir -p $run
  echo "== $name: $flags" | tee -a $OUT/gate.log
  # shellcheck disable=SC2086  # flags are meant to split
  python3 -m lloco_index.cli train compressor --corpus $DATA/corpus.npz --out_dir $run/ckpt --max_minutes "$minutes" \
    --eval_every 100000 --save_every 100000 $flags 2>&1 | grep --line-buffered -v -E "Loading weights|it/s\]" \
    | tee $run/train.log | grep --line-buffered -E "step [0-9]+ |done|Error|Traceback" | sed -u "s/.*INFO/[$name] INFO/" \
    >> $OUT/gate.log  # live: a call that runs out of time still returns its step lines
  for task in $TASKS; do
    python3 scripts/vector_ablation.py --corpus $DATA/corpus.npz --init_from $run/ckpt --task $task --n 32 \
      --out $run/ablation_$task.json 2>&1 | grep -E "loss|Error" | sed "s/^/$task  /" | tee -a $OUT/gate.log
  done
  tar czf $OUT/gate_$name.tgz -C $run .
done
