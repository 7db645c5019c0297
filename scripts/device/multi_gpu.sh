#!/usr/bin/env bash
# Multi-GPU training on a machine of several GPUs (device tool): both trainers, first on every GPU through
# `accelerate launch --multi_gpu` (NCCL), then on one process, with the same flags and minutes, from the shipped
# defaults. The first launch also converts the GGUF in all processes at once (a fresh LLOCO_HOME).
#   bash scripts/device/multi_gpu.sh MINUTES QA_FILE
# Needs $DATA/corpus.npz (DATA defaults to /root/data) and the model parts of setup.sh. Step lines go to
# $OUT/multi_gpu.log, each run's training_state.json (tokens/s of all processes, processes, replicas_in_sync) to
# $OUT/multi_gpu_<trainer>_<processes>.json; the adapters stay on the machine (the runs are timing and sync checks).
set -o pipefail
source scripts/device/setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # the workplace keeps NVLink multicast off; keep it so
DATA=${DATA:-/root/data}; minutes=$1; qa=$2; gpus=$(nvidia-smi -L | wc -l)
P=lloco_index/pretrained/smollm2-135m
C="--corpus $DATA/corpus.npz --init_from $P --task_mix ae:0.2,qa:0.45,cloze:0.2,lm:0.15 --max_chunks 32 --expand_prob 0.4 --warmup_steps 10 --lr 1e-4"
F="--qa_file $qa --init_from $P --decoder_r 8 --decoder_alpha 16 --decoder_dropout 0.05 --lr 2e-5 --epochs 1000 --batch_size 8"
for n in $gpus 1; do
  launch=(python3 -m accelerate.commands.launch --num_processes "$n" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  [ "$n" -gt 1 ] && launch+=(--multi_gpu)
  for trainer in compressor finetune; do
    flags=$C; [ $trainer = finetune ] && flags=$F
    run=/root/mg/${trainer}_$n
    echo "== $trainer on $n process(es): $flags" | tee -a $OUT/multi_gpu.log
    # shellcheck disable=SC2086  # flags are meant to split
    "${launch[@]}" -m lloco_index.cli train $trainer --out_dir $run --max_minutes "$minutes" --eval_every 100000 \
      --save_every 100000 --eval_examples 2 $flags 2>&1 \
      | grep --line-buffered -E "step [0-9]+ |done|Error|Traceback|NCCL WARN|memory" | sed -u 's/.*INFO/INFO/' >> $OUT/multi_gpu.log
    cp $run/training_state.json $OUT/multi_gpu_${trainer}_$n.json
  done
done
