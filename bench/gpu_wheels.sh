#!/usr/bin/env bash
# Wheels the GPU machine lacks for bench/gpu_check.py (issue 19), downloaded here for Python 3.12 /
# manylinux x86-64 into bench/gpu_wheels/ (ignored by git). The GPU machine has no network; it has torch,
# transformers, peft, accelerate, safetensors, scipy, matplotlib, rich, typer, tensorboard (and their deps).
#
#   bash bench/gpu_wheels.sh            # uses .venv/bin/python (or $PYTHON) for the versions to pin
#
# The set is what the check imports (every module in sys.modules after importing all the check's parts, mapped
# to distributions) minus what the listed packages bring with them in every version:
#   diffusers                                 absent there
#   requests urllib3 charset_normalizer idna certifi    diffusers imports requests; transformers 5 and
#                                             huggingface_hub 1.x no longer depend on it
#   pydantic pydantic_core annotated_types typing_inspection   diffalign.config
#   httpx httpcore h11 anyio                  diffalign.rewards.http imports httpx at import time
# Not shipped: importlib_metadata (diffusers declares it but does not import it on Python >= 3.10), fastapi,
# uvicorn, python-multipart, tomli-w (the check never imports them). Versions are pinned to the ones the
# project's virtual environment has, i.e. what the dry run tested. diffusers needs huggingface_hub >= the
# version in its metadata: gpu_check.py's environment record shows the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=bench/gpu_wheels
PACKAGES=(diffusers requests urllib3 charset_normalizer idna certifi pydantic pydantic_core annotated_types
          typing_inspection httpx httpcore h11 anyio)

pins=$("$PYTHON" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # one argument per pin
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --implementation cp --dest "$DEST" $pins
# diffalign itself travels as source (PYTHONPATH=src): no wheel to build.
ls -1 "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $(( total / 1024 )) KiB in $(ls "$DEST"/*.whl | wc -l) wheels ($DEST)"
if [ "$total" -gt $(( 60 * 1024 * 1024 )) ]; then
  echo "over the 60 MB that may travel to the GPU machine" >&2
  exit 1
fi
