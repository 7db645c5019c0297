#!/usr/bin/env bash
# Train seeds of one recipe side by side on one GPU, detached (setsid), so that runs outlast the device tool's
# 10-minute calls; a later call of the same warm machine waits for them. QA runs peak at ~8 GiB and a few % MFU:
# four side by side train at ~48k tokens/s each where one alone trains at ~57k (docs/training.md, sixteenth session).
#   DATA=DIR bash scripts/device/train_seeds.sh MINUTES "TRAIN FLAGS" NAME:SEED [NAME:SEED ...]   # starts, returns
#   bash scripts/device/train_seeds.sh --wait SECONDS   # waits (at most SECONDS) for every run started on this machine
# The runs train from a copy of the tree at /root/repo (a later call replaces the working tree). Each run is
# vector_gate.sh without ablations: checkpoint in /root/gate/NAME/ckpt, archive /root/gout/gate_NAME.tgz, step lines
# in /root/gout/gate.log. --wait copies gate.log and the finished archives to $OUT.
set -o pipefail
if [ "$1" = --wait ]; then
  end=$((SECONDS + ${2:-540}))
  # never pgrep: a pattern would match this call's own command line
  while [ "$(ls /root/gout/*.started 2>/dev/null | wc -l)" -gt "$(ls /root/gout/*.done 2>/dev/null | wc -l)" ] \
      && [ $SECONDS -lt $end ]; do sleep 10; done
  cp /root/gout/gate.log /root/gout/*.tgz "$OUT"/ 2>/dev/null
  grep -h "done\|Error\|Traceback" /root/gout/gate.log | tail -20
  ls /root/gout/*.started 2>/dev/null | while read -r f; do n=$(basename "$f" .started)
    [ -f /root/gout/$n.done ] && echo "$n finished" || echo "$n still running"; done
  exit 0
fi
minutes=$1; flags=$2; shift 2
mkdir -p /root/gout && rm -rf /root/repo && cp -r "$PWD" /root/repo && cd /root/repo || exit 1
source scripts/device/setup.sh
python3 -c "from lloco_index.backbone import Backbone; Backbone.from_pretrained('smollm2-135m')"  # convert the GGUF once
for pair in "$@"; do
  name=${pair%%:*}; seed=${pair##*:}; touch /root/gout/$name.started
  # shellcheck disable=SC2086  # flags are meant to split
  DATA=$DATA TASKS="" OUT=/root/gout setsid bash -c \
    "bash scripts/device/vector_gate.sh $minutes $name \"$flags --seed $seed\"; touch /root/gout/$name.done" \
    > /root/gout/$name.out 2>&1 < /dev/null &
done
sleep 60; tail -n 4 /root/gout/gate.log
