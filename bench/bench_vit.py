"""
Benchmark vit.VisionTransformer against transformers' CLIPVisionModel on the CPU (same weights, same input, one run).

    python bench/bench_vit.py                    # ViT-B/16 at 224, batch 2
    python bench/bench_vit.py --config L --batch 1 --repeats 3   # ViT-L/14 (the one MM-Interleaved uses)
    python bench/bench_vit.py --adapter          # also time the ViT-Adapter forward (ours only: no reference)

A random CLIPVisionModel is saved to a temp folder and loaded by VisionTransformer.from_pretrained (so the loader is
exercised too). Forwards alternate ours / theirs under inference_mode, after a warm-up. Wall time and process CPU
time are both reported (best and median): on shared CPUs the wall time mostly measures the neighbours, and with
--threads 1 the CPU time is the cleaner measure of our own work. ratio = ours / theirs (goal <= 1.0).
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
    """-> (wall seconds, process CPU seconds)"""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


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
    print(f"ViT-{args.config}/{spec['patch_size']} at {spec['image_size']}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} alternating repeats")
    print(f"max |ours - transformers| = {diff:.2e}")
    for k, clock in enumerate(("wall", "CPU")):
        ours_t, theirs_t = [t[k] for t in t_ours], [t[k] for t in t_theirs]
        best = min(ours_t) / min(theirs_t)
        med = statistics.median(ours_t) / statistics.median(theirs_t)
        print(f"{clock:4s} ms  ours best {min(ours_t) * 1e3:7.0f} median {statistics.median(ours_t) * 1e3:7.0f} | "
              f"transformers best {min(theirs_t) * 1e3:7.0f} median {statistics.median(theirs_t) * 1e3:7.0f} | "
              f"ratio ours/transformers best {best:.3f} median {med:.3f}")

    if args.adapter:
        adapter = vit.ViTAdapter(ours).eval()
        images = torch.rand(args.batch, 3, spec["image_size"], spec["image_size"])
        with torch.inference_mode():
            adapter(images)
            t = min(timed(lambda: adapter(images)) for _ in range(max(1, args.repeats // 2)))
        print(f"ViT-Adapter forward (ViT included): wall {t[0] * 1e3:.0f} ms, CPU {t[1] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
