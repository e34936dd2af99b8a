#!/usr/bin/env bash
# The shipped tiny assets from nothing, on a 2-core CPU (the times of each stage: README.md, "Training"):
#   1. assets/tiny-sd: a tiny Stable Diffusion (text-to-image U-Net + frozen stand-in text encoder)
#   2. assets/tiny: MM-Interleaved built on it as the paper builds on SD 2.1 (U-Net frozen; 2 processes of 1 thread)
# Each stage keeps its log (log.jsonl) beside its weights. assets/world.model, the tokenizer, is built by
# assets/make_world_tokenizer.py (needs sentencepiece, a test-only dependency) and is not rebuilt here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out-tiny}
OMP_NUM_THREADS=1 python tiny_sd.py --out_dir=assets/tiny-sd --seed=0 --eval_every=0
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --sd_path=assets/tiny-sd --seed=0 \
    --out_dir="$OUT"
mkdir -p assets/tiny
cp "$OUT/model.safetensors" "$OUT/config.json" "$OUT/log.jsonl" assets/tiny/
echo "assets/tiny and assets/tiny-sd rebuilt; python sample.py runs them"
