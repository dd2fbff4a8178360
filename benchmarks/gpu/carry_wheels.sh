#!/usr/bin/env bash
# Download the wheels a lent GPU machine lacks into .gpu_wheels/ (git-ignored), pinned to the versions of this
# checkout's .venv, so that `run(carry=[".gpu_wheels"])` brings them along (the GPU machine reaches no index).
#
# The GPU image has torch, triton, accelerate, numpy, pytest, safetensors, ... (device KINDS.md) but not diffusers,
# omegaconf or open_clip_torch (tcscale reads the CLIP BPE file shipped inside it), and a transformers 5 /
# huggingface_hub 1.x that our pinned diffusers/transformers were not tested with: those come from here.
set -euo pipefail
cd "$(dirname "$0")/../.."
VPY=${VPY:-.venv/bin/python}
DEST=.gpu_wheels
PKGS=(diffusers transformers tokenizers huggingface_hub omegaconf open_clip_torch importlib_metadata)

pins=()
for pkg in "${PKGS[@]}"; do
    pins+=("$pkg==$("$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")")
done
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
# the GPU machine runs CPython 3.12 on x86_64 (KINDS.md); pure-Python wheels, and abi3 wheels for tokenizers
"$VPY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST.tmp" "${pins[@]}"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
ls "$DEST"
