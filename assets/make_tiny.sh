#!/usr/bin/env bash
# The shipped tiny assets from nothing, on a 2-core CPU (the times of each stage: README.md, "Training"):
#   1. assets/tiny-sd: a tiny Stable Diffusion (text-to-image U-Net + frozen stand-in text encoder)
#   2. MM-Interleaved on it, stage 1 (tiny-only, no U-Net pass): the decoder's context warm-started on captions, then
#      the text loss plus the condition distillation of every drawn image (distill.py) on the document mixture
#   3. stage 2, the paper's two losses (the distillation kept as an auxiliary loss): the U-Net's MMFS taps learn
#   4. stage 3 (tiny-only): questions only, the text loss only: finding a named colour ("where is the red shape?")
#   5. stage 4 (tiny-only): a fifth questions, a tenth text-to-image, the rest stories whose first scene holds 3-4
#      objects (the stories the model missed), the distillation (weight 3) for the pictures: the same lookup for an edit
#   6. stage 5, stage 2 again (as long), the distillation at weight 3: a lone picture is captioned again, the U-Net
#      taps follow -> assets/tiny.
#   The MMI stages run as 2 processes of 1 thread.
# Stages 1, 3, 4 and 5 evaluate during the stage (their logs have the curve), stage 2 once, at its end; an
# evaluation does not change the weights (tests/test_train.py; a stage 4 run with and without them wrote
# byte-identical weights).
# Each stage keeps its log beside its weights (assets/tiny-sd/log.jsonl, assets/tiny/log-stage1.jsonl ...
# log-stage5.jsonl). assets/world.model, the tokenizer, is built by assets/make_world_tokenizer.py (needs
# sentencepiece, a test-only dependency) and is not rebuilt here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out-tiny}
MMI="env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --sd_path=assets/tiny-sd --seed=0"
OMP_NUM_THREADS=1 python tiny_sd.py --out_dir=assets/tiny-sd --seed=0 --eval_every=0
$MMI --out_dir="$OUT/stage1" --warm_steps=1000 --diffusion=False --distill_weight=1 \
    --kinds=i2t:0.25,qa:0.3,t2i:0.15,story:0.3 --max_steps=5500 --eval_interval=1000 --eval_kinds=i2t,qa
$MMI --out_dir="$OUT/stage2" --init_from="$OUT/stage1" --distill_weight=1 --lr=5e-4 \
    --kinds=i2t:0.4,qa:0.25,t2i:0.1,story:0.25 --max_steps=1200
$MMI --out_dir="$OUT/stage3" --init_from="$OUT/stage2" --diffusion=False --lr=5e-4 \
    --kinds=qa:1 --max_steps=2000 --eval_interval=500 --eval_kinds=qa
$MMI --out_dir="$OUT/stage4" --init_from="$OUT/stage3" --diffusion=False --distill_weight=3 --lr=5e-4 \
    --kinds=qa:0.2,t2i:0.1,story:0.7 --story_min_shapes=3 --max_steps=4500 --eval_kinds=qa,t2i,story --eval_interval=1500
$MMI --out_dir="$OUT/stage5" --init_from="$OUT/stage4" --distill_weight=3 --lr=5e-4 \
    --kinds=i2t:0.4,qa:0.25,t2i:0.1,story:0.25 --max_steps=1200 --eval_interval=600
mkdir -p assets/tiny
cp "$OUT/stage5/model.safetensors" "$OUT/stage5/config.json" assets/tiny/
for i in 1 2 3 4 5; do cp "$OUT/stage$i/log.jsonl" "assets/tiny/log-stage$i.jsonl"; done
echo "assets/tiny and assets/tiny-sd rebuilt; python sample.py runs them"
