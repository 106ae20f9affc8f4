#!/usr/bin/env bash
# ftsup's GPU health code against the real NVML, on a machine with an NVIDIA GPU.
#
#   bench/gpu_check.sh                 # ~30 s; JSON to $OUT/gpu_check.json or bench/results/
#   GPU_CHECK_SECONDS=60 bench/gpu_check.sh
#
# Uses $PYTHON, else the repository's .venv, else a venv in $FTSUP_BENCH_VENV
# (default /tmp/ftsup-gpu-check-venv) built with the system's site-packages (so
# an installed torch is used for the load; without torch the load is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-}
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
    VENV=${FTSUP_BENCH_VENV:-/tmp/ftsup-gpu-check-venv}
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
    "$PY" -c "import pynvml, rich" 2>/dev/null || "$PY" -m pip install -q nvidia-ml-py rich
fi

# The code is imported as ftsup.supervisor. Where this checkout is not installed
# (or an editable install points elsewhere), map the name onto it.
if ! "$PY" -c "import ftsup.supervisor.health.gpu" 2>/dev/null; then
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/ftsup"
    ln -s "$ROOT/supervisor" "$SHIM/ftsup/supervisor"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== nvidia-smi"
nvidia-smi -L 2>&1 || echo "(nvidia-smi not available)"
echo "== python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), $("$PY" -c 'import pynvml; print("nvidia-ml-py", getattr(pynvml, "__version__", "?"))' 2>&1)"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>/dev/null || echo "torch: not installed (no load)"

OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
echo "== ftsup gpus"
"$PY" -c 'import sys; from ftsup.supervisor.cli.main import main; sys.exit(main(["gpus"]))' 2>/dev/null \
    || "$PY" -c 'import argparse, sys; from ftsup.supervisor.cli import gpus_cmd; sys.exit(gpus_cmd.run(argparse.Namespace(json=False, watch=False, interval=2.0)))'
echo "== monitor, load, stacks, diagnosis, checks"
timeout 170 "$PY" bench/gpu_check.py --seconds "${GPU_CHECK_SECONDS:-20}" --out "$OUT_DIR/gpu_check.json"
if "$PY" -c "import transformers, peft, ftsup.trainer.standby" 2>/dev/null; then
    echo "== warm standby: no CUDA while waiting, takeover after"
    timeout 600 "$PY" bench/standby_check.py --out "$OUT_DIR/standby_check.json" || echo "standby check FAILED"
    echo "== the daemon's spare: no CUDA while waiting, the placement's GPU after activation"
    timeout 300 "$PY" bench/standby_check.py --spare --out "$OUT_DIR/spare_check.json" || echo "spare check FAILED"
else
    echo "== warm standby: skipped (transformers/peft or the trainer not importable here)"
fi
