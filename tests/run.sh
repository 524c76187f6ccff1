#!/usr/bin/env bash
# Install LoRA Studio with its test extras into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"   # first, so the project's range does not pull another build
.venv/bin/pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
