"""
Benchmark vit.VisionTransformer against transformers' CLIPVisionModel on the CPU (same weights, same input, one run).

    python bench/bench_vit.py                    # ViT-B/16 at 224, batch 2
    python bench/bench_vit.py --config L --batch 1 --repeats 3   # ViT-L/14 (the one MM-Interleaved uses)
    python bench/bench_vit.py --adapter          # also time the ViT-Adapter forward (ours only: no reference)

A random CLIPVisionModel is saved to a temp folder and loaded by VisionTransformer.from_pretrained (so the loader is
exercised too). Forwards alternate ours / theirs under inference_mode, after a warm-up; the best time of each is
reported (the CPUs are shared), with the median, and ratio = ours / theirs of both (goal <= 1.0).
"""
import argparse
import statistics
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vit  # noqa: E402

CONFIGS = {
    "B": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
              image_size=224),
    "L": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
              image_size=224),
}


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=CONFIGS, default="B")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--adapter", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    spec = CONFIGS[args.config]
    theirs = CLIPVisionModel(CLIPVisionConfig(**spec)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = vit.VisionTransformer.from_pretrained(tmp)
    x = torch.randn(args.batch, 3, spec["image_size"], spec["image_size"])

    with torch.inference_mode():
        diff = (ours(x) - theirs(pixel_values=x).last_hidden_state).abs().max().item()  # also the warm-up
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(lambda: ours(x)))
            t_theirs.append(timed(lambda: theirs(pixel_values=x)))
    a, b = min(t_ours), min(t_theirs)
    print(f"ViT-{args.config}/{spec['patch_size']} at {spec['image_size']}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"max |ours - transformers| = {diff:.2e}")
    print(f"ours         {a * 1000:8.1f} ms   (all: {', '.join(f'{t * 1000:.0f}' for t in t_ours)})")
    print(f"transformers {b * 1000:8.1f} ms   (all: {', '.join(f'{t * 1000:.0f}' for t in t_theirs)})")
    med = statistics.median(t_ours) / statistics.median(t_theirs)
    print(f"ratio ours/transformers = {a / b:.3f} (best)   {med:.3f} (median)")

    if args.adapter:
        adapter = vit.ViTAdapter(ours).eval()
        images = torch.rand(args.batch, 3, spec["image_size"], spec["image_size"])
        with torch.inference_mode():
            adapter(images)
            t = min(timed(lambda: adapter(images)) for _ in range(max(1, args.repeats // 2)))
        print(f"ViT-Adapter forward (ViT included) {t * 1000:.1f} ms")


if __name__ == "__main__":
    main()
