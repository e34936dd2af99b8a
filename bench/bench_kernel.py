"""GPU benchmark of the deformable-attention kernel against the pure-torch reference (mmfs.deform_attn_reference).

    python bench/bench_kernel.py                    # both cases, fp32
    python bench/bench_kernel.py --case llm --dtype bf16 --iters 50

Cases (the shapes MM-Interleaved runs; see docs/official.md):
    llm   MMFS in the LLM: B=1, Q=2048 text tokens, 4 images x 3 levels (32/16/8), 16 heads x 64, 8 points
    unet  MMFS on a U-Net skip: B=2 (guidance pair), Q=64*64 pixels, 1 image x 4 levels (64/32/16/8), 16 heads x 32,
          8 points
For each: build time of the kernel (first call), forward and forward+backward time (median of --iters, CUDA events),
peak memory above the inputs, and the largest difference kernel vs reference (output and the three gradients).
There is no CPU mode: on the CPU only the reference runs (mmfs's own benchmark times that).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository root
import mmfs_kernel  # noqa: E402
from mmfs import deform_attn_reference  # noqa: E402

CASES = {
    "llm": dict(B=1, Q=2048, levels=[(32, 32), (16, 16), (8, 8)] * 4, M=16, D=64, P=8),
    "unet": dict(B=2, Q=64 * 64, levels=[(64, 64), (32, 32), (16, 16), (8, 8)], M=16, D=32, P=8),
}


def make_inputs(B, Q, levels, M, D, P, dtype, device):
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L, S = len(levels), int(areas.sum())
    value = torch.randn(B, S, M, D, device=device, dtype=dtype)
    loc = (torch.rand(B, Q, M, L, P, 2, device=device) * 1.1 - 0.05).to(dtype)  # a few points beyond the border
    attn = torch.rand(B, Q, M, L * P, device=device).softmax(-1).view(B, Q, M, L, P).to(dtype)
    return value, shapes, starts, loc, attn


def timed(fn, iters):
    """Median milliseconds of fn() over iters runs (after warm-up) and peak memory (MiB) allocated during one run."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], peak


def run_case(name, dtype, iters):
    cfg = CASES[name]
    args = make_inputs(**cfg, dtype=dtype, device="cuda")
    value, shapes, starts, loc, attn = args
    grad_out = torch.randn(cfg["B"], cfg["Q"], cfg["M"] * cfg["D"], device="cuda", dtype=dtype)

    t0 = time.perf_counter()
    mmfs_kernel.cuda_deform_attn(*args)  # first call compiles (NVRTC or nvcc) and loads the kernel
    torch.cuda.synchronize()
    print(f"\n[{name}] {cfg}  dtype={dtype}  kernel build+first call {time.perf_counter() - t0:.2f} s")

    def fwd_bwd(fn):
        leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], grad_out)
        return out, grads

    # agreement (fp32 atomics add in any order, so expect ~1e-6 relative, not bit equality)
    out_k, grads_k = fwd_bwd(mmfs_kernel.cuda_deform_attn)
    out_r, grads_r = fwd_bwd(deform_attn_reference)
    for what, a, b in zip(["out", "d value", "d loc", "d attn"], (out_k, *grads_k), (out_r, *grads_r)):
        err = (a.float() - b.float()).abs().max().item()
        print(f"  max |kernel - reference| {what:8s} {err:.2e}   (reference max {b.float().abs().max().item():.2e})")

    rows = []
    for label, fn in [("kernel", mmfs_kernel.cuda_deform_attn), ("reference", deform_attn_reference)]:
        with torch.no_grad():
            f_ms, f_mem = timed(lambda: fn(*args), iters)
        fb_ms, fb_mem = timed(lambda: fwd_bwd(fn), iters)
        rows.append((label, f_ms, f_mem, fb_ms, fb_mem))
    print(f"  {'':10s} {'fwd ms':>9s} {'fwd MiB':>9s} {'fwd+bwd ms':>11s} {'fwd+bwd MiB':>12s}")
    for label, f_ms, f_mem, fb_ms, fb_mem in rows:
        print(f"  {label:10s} {f_ms:9.3f} {f_mem:9.1f} {fb_ms:11.3f} {fb_mem:12.1f}")
    (_, kf, _, kfb, _), (_, rf, _, rfb, _) = rows
    print(f"  speed-up of the kernel: forward {rf / kf:.2f}x, forward+backward {rfb / kfb:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--iters", type=int, default=20)
    opt = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/bench_kernel.py: no CUDA GPU on this machine, nothing to time. The kernel is verified on the CPU "
                 "by emulation (python -m pytest tests/test_kernel.py) and compile-checked with nvcc, not timed.")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opt.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    for name in CASES if opt.case == "all" else [opt.case]:
        run_case(name, dtype, opt.iters)


if __name__ == "__main__":
    main()
