#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): installs what it needs, then
# runs the linters and pytest (unit, capture replays, and the namespace end-to-end suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check guard hushsim tests bench
.venv/bin/python -m pytest -q "$@"
