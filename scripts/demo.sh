#!/usr/bin/env bash
# Set up the runtime and run the main job on the embedded default model (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lloco demo "$@"
