"""
Benchmark unet.py against diffusers on the CPU, and measure peak memory while loading a full-size SD 2.1 U-Net.

    python bench/bench_unet.py                 # speed (mid-size configs) + loading memory (writes ~1.7 GB to /tmp)
    python bench/bench_unet.py --skip-memory   # speed only
    python bench/bench_unet.py --threads 2 --repeats 5

Speed: a random diffusers UNet2DConditionModel / AutoencoderKL (mid-size SD 2-style configs) is saved to a temp
folder and loaded with our from_pretrained; forwards alternate ours / theirs under inference_mode after a warm-up,
the best of each is reported (the CPUs are shared) and ratio = ours / theirs (goal <= 1.0).
Memory: a full-size SD 2.1 U-Net (866 M params) is written as one fp16 safetensors file of random values, then a
fresh subprocess loads it with UNet.from_pretrained(file, dtype=float16) and reports its peak RSS
(resource.getrusage) divided by the file size (goal <= 1.2). The file is deleted afterwards.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import unet  # noqa: E402

UNET_MID = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 256),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4), cross_attention_dim=256, use_linear_projection=True)
VAE_MID = dict(in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def race(name, ours, theirs, repeats):
    with torch.inference_mode():
        diff = (ours() - theirs()).abs().max().item()  # also the warm-up
        a, b = [], []
        for _ in range(repeats):
            a.append(timed(ours))
            b.append(timed(theirs))
    print(f"{name}: max |ours - diffusers| = {diff:.2e}")
    print(f"  ours      {min(a) * 1000:8.1f} ms   (all: {', '.join(f'{t * 1000:.0f}' for t in a)})")
    print(f"  diffusers {min(b) * 1000:8.1f} ms   (all: {', '.join(f'{t * 1000:.0f}' for t in b)})")
    print(f"  ratio ours/diffusers = {min(a) / min(b):.3f}")


def speed(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        d_unet = UNet2DConditionModel(**UNET_MID).eval()
        d_unet.save_pretrained(os.path.join(tmp, "unet"))
        d_vae = AutoencoderKL(**VAE_MID).eval()
        d_vae.save_pretrained(os.path.join(tmp, "vae"))
        o_unet, o_vae = unet.UNet.from_pretrained(tmp), unet.AutoencoderKL.from_pretrained(tmp)
    x, t, c = torch.randn(args.batch, 4, 32, 32), torch.tensor([500] * args.batch), torch.randn(args.batch, 77, 256)
    print(f"U-Net {UNET_MID['block_out_channels']} on {tuple(x.shape)}, context {tuple(c.shape)}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    race("U-Net forward", lambda: o_unet(x, t, c), lambda: d_unet(x, t, c).sample, args.repeats)
    z = torch.randn(args.batch, 4, 32, 32)
    print(f"VAE {VAE_MID['block_out_channels']} decode {tuple(z.shape)} -> {args.batch}x3x128x128")
    race("VAE decode", lambda: o_vae.decode(z), lambda: d_vae.decode(z).sample, args.repeats)


def write_full_size(path):
    """A full-size SD 2.1 U-Net in the original single-file layout is not needed: the diffusers names load the same
    way; we write them (fp16, random) without ever holding an fp32 model."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = unet.UNet(unet.UNetConfig(upcast_attention=True))
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.02).half() for k, v in model.state_dict().items()}
    save_file(tensors, path)


LOAD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import unet
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = unet.UNet.from_pretrained({path!r}, dtype=torch.float16, config=unet.UNetConfig(upcast_attention=True))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# tensors may still be lazily mapped pages of the file: read every one so the figure counts the whole model
n = sum(p.numel() for p in m.parameters() if p.sum() is not None)
print(base * 1024, loaded * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n)
"""


def memory(args):
    path = os.path.join(tempfile.gettempdir(), "bench_unet_sd21_fp16.safetensors")
    try:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        f"from bench.bench_unet import write_full_size; write_full_size({path!r})"], check=True, cwd=ROOT)
        size = os.path.getsize(path)
        out = subprocess.run([sys.executable, "-c", LOAD.format(root=ROOT, path=path)], check=True,
                             capture_output=True, text=True).stdout.split()
        base, loaded, peak, n = map(int, out)
        print(f"SD 2.1 U-Net, {n / 1e6:.0f} M params, fp16 safetensors {size / 2**30:.2f} GiB")
        print(f"  peak RSS {peak / 2**30:.2f} GiB after loading and reading every parameter "
              f"(after imports: {base / 2**30:.2f} GiB; right after from_pretrained: {loaded / 2**30:.2f} GiB)")
        print(f"  peak RSS / file size = {peak / size:.3f}   (loading only: (peak - base) / size = {(peak - base) / size:.3f})")
    finally:
        if os.path.exists(path):
            os.remove(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
