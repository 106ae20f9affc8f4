#!/usr/bin/env bash
# A cached venv with LLaMA-Factory 0.9.5 on the CPU build of torch, for
# bench/llamafactory/run.py. Idempotent: a stamp file written last says the venv
# is complete; a second call with the same recipe returns at once.
#
#   bash bench/llamafactory/setup_venv.sh            # prints the venv path
#   FTSUP_LF_VENV=/tmp/lf bash bench/llamafactory/setup_venv.sh
#
# Why the steps below:
# - torch==2.13.0 first: pip takes that CPU wheel from this machine's disk; the
#   constraints file keeps LLaMA-Factory's `torch>=2.4.0` from replacing it.
# - PyPI's torchvision is built against another torch and fails to import
#   ("operator torchvision::nms does not exist"); transformers would then fail
#   on import too. LLaMA-Factory needs it only for images: it is removed.
# - torchaudio (2.11.1, a CUDA build) is imported at module level by
#   llamafactory.data.mm_plugin, so it must import, but its native libraries
#   do not load beside torch 2.13.0. torchaudio skips them when the files are
#   absent (its `_load_lib` returns False), so they are renamed *.so.disabled.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${FTSUP_LF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ftsup/lf-0.9.5-venv}"
PYTHON="${PYTHON:-python3.11}"
LF_VERSION="0.9.5"
TORCH_VERSION="2.13.0"
CONSTRAINTS="$HERE/constraints.txt"
# The recipe: a change to any of these rebuilds the venv.
RECIPE="lf=$LF_VERSION torch=$TORCH_VERSION $(sha256sum "$CONSTRAINTS" "$0" | awk '{print $1}' | tr '\n' ' ')"
STAMP="$VENV/.ftsup-lf-ready"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]]; then
    echo "$VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Another caller may have finished while this one waited for the lock.
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]]; then
    echo "$VENV"
    exit 0
fi

start=$(date +%s)
if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]]; then
    echo "refusing to replace $VENV: it exists and is not a venv" >&2
    exit 2
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install "torch==$TORCH_VERSION" >&2
"${PIP[@]}" install -c "$CONSTRAINTS" "llamafactory==$LF_VERSION" >&2
"${PIP[@]}" uninstall -y torchvision >&2

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for lib in "$site"/torchaudio/lib/*.so; do
    [[ -e "$lib" ]] && mv "$lib" "$lib.disabled"
done

# Smoke test: everything `llamafactory-cli train` imports for an SFT run.
"$VENV/bin/python" - >"$VENV/ftsup-lf-versions.json" <<'PY'
import importlib.metadata as md, json
import torch, torchaudio, transformers, peft, trl  # noqa: F401
import llamafactory.data.mm_plugin  # noqa: F401  (imports torchaudio)
import llamafactory.train.tuner  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
names = ["llamafactory", "torch", "torchaudio", "transformers", "peft", "trl",
         "accelerate", "datasets", "tokenizers", "safetensors"]
print(json.dumps({name: md.version(name) for name in names}, indent=2))
PY
"$VENV/bin/llamafactory-cli" version >/dev/null

echo "$RECIPE" >"$STAMP"
end=$(date +%s)
echo "LLaMA-Factory venv ready in $((end - start)) s: $VENV ($(du -sh "$VENV" | cut -f1))" >&2
cat "$VENV/ftsup-lf-versions.json" >&2
echo "$VENV"
