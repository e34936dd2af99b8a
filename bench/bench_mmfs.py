"""Time and peak memory of the MMFS deformable-attention op: our grouped grid_sample reference vs the usual
per-(image, level) loop; and the cost of MMFS in the tiny model's LLM on rows packed as in training.

    python bench/bench_mmfs.py                 # all cases, CPU, 1 thread
    python bench/bench_mmfs.py --case=llm --threads=2 --repeats=5
    python bench/bench_mmfs.py --device=cuda   # on a GPU: also the kernel of kernels/ (through mmfs.deform_attn)
    python bench/bench_mmfs.py --case=packed --baseline=HEAD~3   # also mmfs.py of that git revision, same run

Every (case, implementation, mode) runs in its own subprocess, so that its peak memory is its own: on the CPU, the
peak resident set (ru_maxrss) minus the resident set with the inputs built; on a GPU, torch.cuda's peak allocation.
On a shared machine, process-CPU time (1 thread) is the steadier figure; wall time counts waiting for a core.
Cases (batch 1, 16 heads x 64 channels, 8 points, fp32):
    llm   Q=2048 tokens, 4 images x levels 32/16/8 (official LLM use: 12 "levels" in the op)
    unet  Q=64*64 pixels of the first skip, 1 image x levels 64/32/16/8 (official U-Net use)
    packed  the tiny model (mmi.py), LLM forward on --batch_size rows of --seq_len tokens of the synthetic world, as
          in training: without MMFS, with MMFS (and with the MMFS module of --baseline), forward and forward+backward;
          medians of process-CPU time over --repeats interleaved runs (a loaded machine slows all variants alike)
    tiny  the op at the shapes of the tiny training step (bench_mmi.py: batch 4 x 128): U-Net taps, ViT-Adapter, the
          LLM's packed atlas; deform_attn_reference vs deform_attn_cpu (what deform_attn runs on CPUs), forward and
          forward+backward, interleaved in one process (medians of process-CPU time); with --baseline, also a U-Net
          tap's MMFS module (forward+backward) with the MMFS class of that revision
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mmfs  # noqa: E402

CASES = {
    "llm": dict(Q=2048, images=4, levels=[32, 16, 8]),
    "unet": dict(Q=64 * 64, images=1, levels=[64, 32, 16, 8]),
}
M, D, P = 16, 64, 8


def naive_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The usual pure-torch version: one grid_sample per (image, level), all samples stacked, then weighted."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grid = 2 * sampling_locations - 1
    sampled = []
    for l, (H, W) in enumerate(spatial_shapes.tolist()):
        s = int(level_start_index[l])
        v = value[:, s:s + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        g = grid[:, :, :, l].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, -2).flatten(-2)                               # (B*M, D, Q, L*P)
    a = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    return (sampled * a).sum(-1).view(B, M * D, Q).transpose(1, 2)              # (B, Q, M*D)


IMPLS = {"grouped": mmfs.deform_attn_reference, "naive": naive_deform_attn, "dispatch": mmfs.deform_attn}


def make_inputs(case, device, grad, seed=0, Q=None):
    c = CASES[case]
    Q = Q or c["Q"]
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[s, s] for s in c["levels"]] * c["images"])
    L, S = len(shapes), int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(1, S, M, D, generator=g)
    loc = 0.5 + 0.3 * torch.randn(1, Q, M, L, P, 2, generator=g)               # some points fall off the map
    w = torch.rand(1, Q, M, L, P, generator=g)
    w = w / w.sum((-2, -1), keepdim=True)
    ts = [t.to(device).requires_grad_(grad) for t in (value, loc, w)]
    shapes = shapes.to(device)
    return ts[0], shapes, mmfs.level_starts(shapes), ts[1], ts[2]


def worker(case, impl, mode, device, repeats, baseline=None):
    grad = mode == "fwd+bwd"
    args = make_inputs(case, device, grad)
    fn = load_baseline(baseline).deform_attn_reference if impl == "baseline" else IMPLS[impl]
    cuda = device == "cuda"

    def run(args=args):
        with torch.set_grad_enabled(grad):
            out = fn(*args)
            if grad:
                out.sum().backward()
        if cuda:
            torch.cuda.synchronize()

    run(make_inputs(case, device, grad, Q=16))  # a small call first: lazy init and code pages are not the op's

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # resident set now (Linux), not the peak so far: setup temporaries would hide part of the op's peak
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0, c0 = time.perf_counter(), time.process_time()
    run()                                                                        # first call: also the memory probe
    first = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [first] if not cuda else []                                          # no compile/warm-up noise on CPU
    for _ in range(repeats - len(times)):
        for t in args:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return dict(case=case, impl=impl, mode=mode, ms=1e3 * statistics.median(t for t, _ in times),
                cpu_ms=1e3 * statistics.median(c for _, c in times), peak_mb=(peak - base) / 2**20)


def check_agreement(device):
    """The two pure-torch implementations compute the same thing (on a small copy of each case)."""
    for case in CASES:
        value, shapes, starts, loc, w = make_inputs(case, device, grad=False, Q=64)
        a = mmfs.deform_attn_reference(value, shapes, starts, loc, w)
        b = naive_deform_attn(value, shapes, starts, loc, w)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def load_baseline(rev):
    """mmfs.py as of git revision `rev`, as a module of its own: the "before" of a before/after in one run."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:mmfs.py"], check=True, capture_output=True, text=True)
    module = types.ModuleType(f"mmfs@{rev}")
    exec(compile(src.stdout, f"{rev}:mmfs.py", "exec"), module.__dict__)
    return module


def bench_packed(args):
    """MMFS in the tiny model's LLM on packed rows: forward (no grad) and forward+backward, without MMFS layers,
    with them, and with the MMFS class of --baseline swapped in (same parameters, so the same numbers)."""
    import data
    from mmi import MMI, MMIConfig
    torch.manual_seed(0)
    model = MMI(MMIConfig.from_name("tiny")).eval()
    ds = data.SyntheticDataset(model.tok, model.cfg.n_image_tokens, args.seq_len, image_size=model.cfg.image_size)
    batch = ds.batch(0, args.batch_size)
    tokens = batch["tokens"]
    with torch.no_grad():
        x, ctx, _, _ = model.llm_inputs(tokens, batch["images"], batch["doc_ids"])
    vis = ctx.visible
    print(f"packed: tiny LLM, batch {tuple(tokens.shape)}, {len(batch['images'])} images, at most {vis.shape[-1]} "
          f"per row; (token, image) pairs visible: {int(vis.sum())} of {vis.numel()} "
          f"({vis.sum() / vis.numel():.0%}); tokens that see an image: {int(vis.any(-1).sum())} of "
          f"{vis[..., 0].numel()}")
    layers = {i: b.inserted for i, b in enumerate(model.llm.layers) if b.inserted is not None}
    modules = [m for m in model.llm.modules() if isinstance(m, mmfs.MMFS)]
    classes = {"mmfs": mmfs.MMFS}
    if args.baseline:
        classes[f"mmfs@{args.baseline}"] = load_baseline(args.baseline).MMFS

    def run(variant, grad):
        for i, layer in layers.items():
            model.llm.layers[i].inserted = None if variant is None else layer
        for m in modules:
            m.__class__ = classes.get(variant, mmfs.MMFS)
        model.zero_grad(set_to_none=True)
        x.grad = None
        with torch.set_grad_enabled(grad):
            h = model.llm.forward_hidden(embeds=x.requires_grad_(grad), ctx=None if variant is None else ctx)
            if grad:
                h.square().mean().backward()
        return h.detach()

    outs = {v: run(v, False) for v in classes}
    for v in list(classes)[1:]:
        print(f"  max |LLM output with {v} - with mmfs|: {(outs[v] - outs['mmfs']).abs().max():.2e}")
    for grad in (False, True):
        times = {v: [] for v in [None, *classes]}
        for _ in range(args.repeats or 21):  # interleaved, so that load from other processes hits every variant
            for v in times:
                c0 = time.process_time()
                run(v, grad)
                times[v].append(time.process_time() - c0)
        ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
        print(f"  LLM {'fwd+bwd' if grad else 'fwd':7} without MMFS {ms[None]:6.1f} ms; "
              + "; ".join(f"with {v} {ms[v]:6.1f} ms ({ms[v] / ms[None] - 1:+.0%})" for v in classes), flush=True)
    run("mmfs", False)  # leave the model as built


# (B, Q, M, D, P, levels) of the op's calls in one tiny training step
TINY = {"unet tap 32x32": (4, 1024, 4, 16, 2, [16, 8, 4, 2]), "unet tap 16x16": (4, 256, 4, 16, 2, [16, 8, 4, 2]),
        "unet tap 8x8": (4, 64, 4, 16, 2, [16, 8, 4, 2]), "adapter": (15, 84, 4, 8, 4, [8, 4, 2]),
        "llm atlas": (1, 437, 4, 16, 6, [(51, 63)])}


def bench_tiny(args):
    def inputs(B, Q, M, D, P, levels):
        g = torch.Generator().manual_seed(0)
        shapes = torch.tensor([s if isinstance(s, tuple) else (s, s) for s in levels])
        S, L = int((shapes[:, 0] * shapes[:, 1]).sum()), len(shapes)
        return (torch.randn(B, S, M, D, generator=g), shapes, mmfs.level_starts(shapes),
                0.5 + 0.3 * torch.randn(B, Q, M, L, P, 2, generator=g), torch.rand(B, Q, M, L, P, generator=g))

    def timed(fn, grad):  # process-CPU ms of one call (forward, or forward + backward)
        c0 = time.process_time()
        with torch.set_grad_enabled(grad):
            out = fn()
            if grad:
                out.sum().backward()
        return 1e3 * (time.process_time() - c0)

    impls = {"reference": mmfs.deform_attn_reference, "cpu": mmfs.deform_attn_cpu}
    print(f"tiny: op at the tiny step's shapes, threads={args.threads}, medians of {args.repeats or 21} interleaved "
          "runs, process-CPU ms")
    for name, shape in TINY.items():
        for grad in (False, True):
            x = [t.requires_grad_(grad) if t.is_floating_point() else t for t in inputs(*shape)]
            ms = {k: [] for k in impls}  # interleaved: a loaded machine slows both alike
            for _ in range(args.repeats or 21):
                for k, f in impls.items():
                    ms[k].append(timed(lambda f=f: f(*x), grad))
            ms = {k: statistics.median(v) for k, v in ms.items()}
            print(f"  {name:15} {'fwd+bwd' if grad else 'fwd':7} reference {ms['reference']:6.2f}  cpu "
                  f"{ms['cpu']:6.2f}  speed-up {ms['reference'] / ms['cpu']:.2f}x", flush=True)
    if args.baseline:  # the U-Net's first tap as a module: the op and MMFS.forward's own work (heads, softmax)
        torch.manual_seed(0)
        m = mmfs.MMFS(32, 64, 4, 4, 2, head_dim=16, offset_init=1, max_images=1, base_grid=(32, 32))
        q = torch.randn(4, 1024, 32, requires_grad=True)
        v, shapes = torch.randn(4, 1, 340, 64), torch.tensor([[16, 16], [8, 8], [4, 4], [2, 2]])
        ref, vis = mmfs.pixel_centres(32, 32), torch.ones(4, 1024, 1, dtype=torch.bool)
        classes = {"mmfs": mmfs.MMFS, f"mmfs@{args.baseline}": load_baseline(args.baseline).MMFS}
        for grad in (False, True):
            ms = {k: [] for k in classes}
            for _ in range(args.repeats or 21):
                for k, cls in classes.items():
                    m.__class__ = cls
                    ms[k].append(timed(lambda: m(q, ref, v, shapes, vis), grad))
            ms = {k: statistics.median(t) for k, t in ms.items()}
            new, old = ms["mmfs"], ms[f"mmfs@{args.baseline}"]
            print(f"  unet tap MMFS module {'fwd+bwd' if grad else 'fwd':7} with mmfs@{args.baseline} {old:6.2f}  "
                  f"with mmfs {new:6.2f}  speed-up {old / new:.2f}x", flush=True)
        m.__class__ = mmfs.MMFS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=[*CASES, "packed", "tiny", "all"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="timed runs (default: 3 per op case, 21 for packed)")
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "IMPL", "MODE"))
    ap.add_argument("--batch_size", type=int, default=4, help="packed: rows (training: 4)")
    ap.add_argument("--seq_len", type=int, default=128, help="packed: tokens per row (training: 128)")
    ap.add_argument("--baseline", help="also time mmfs.py of this git revision (before/after in one run): its "
                    "deform_attn_reference (impl 'baseline') and, in packed, its MMFS module")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.device, a.repeats or 3, a.baseline)))
        return
    if a.case == "packed":
        return bench_packed(a)
    if a.case == "tiny":
        return bench_tiny(a)
    repeats = a.repeats or 3
    check_agreement(a.device)
    impls = ["grouped", "naive"] + (["dispatch"] if a.device == "cuda" else []) + (["baseline"] if a.baseline else [])
    print(f"device={a.device} threads={a.threads} repeats={repeats} (medians of wall and process-CPU ms; "
          f"peak MB above the inputs)")
    print(f"{'case':6} {'impl':9} {'mode':8} {'wall ms':>9} {'cpu ms':>9} {'peak MB':>9}")
    for case in (CASES if a.case == "all" else [a.case]):
        for impl in impls:
            for mode in ("fwd", "fwd+bwd"):
                cmd = [sys.executable, __file__, "--worker", case, impl, mode, "--device", a.device,
                       "--threads", str(a.threads), "--repeats", str(repeats)] + \
                    (["--baseline", a.baseline] if a.baseline else [])
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                print(f"{case:6} {impl:9} {mode:8} {r['ms']:9.0f} {r['cpu_ms']:9.0f} {r['peak_mb']:9.0f}", flush=True)
    if a.case == "all" and a.device == "cpu":
        bench_packed(a)


if __name__ == "__main__":
    main()
