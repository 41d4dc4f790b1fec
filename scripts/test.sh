#!/usr/bin/env bash
# The one test command: bash scripts/test.sh [pytest args...] (after bash scripts/setup.sh).
# Defaults: quiet, a per-test timeout generous enough for one vLLM engine start on CPU
# (~25 s) plus generation; later -q/--timeout arguments override them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    echo "[test] .venv missing: run bash scripts/setup.sh first" >&2
    exit 2
fi
exec .venv/bin/python -m pytest -q --timeout=600 "$@"
