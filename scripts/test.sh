#!/usr/bin/env bash
# Set up the dev environment and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
python3 -m pytest -q -p no:cacheprovider "$@"
