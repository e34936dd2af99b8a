"""
Benchmarks of the assembled model (mmi.py) on the CPU:
  1. tiny-config training step, split by component: image tokenizer (ViT + adapter + resampler), LLM + MMFS,
     image decoder (context resampler + U-Net + MMFS), and the whole step (forward + backward + AdamW); AdamW alone,
     its per-parameter loop against its fused kernel;
  2. generation: text tokens/s (KV cache) and seconds per image (DDPM, steps, guidance);
  3. MMFS overhead in the LLM: forward time with vs without the MMFS layers (tiny and a medium config;
     the paper reports about +6% runtime).

    python bench/bench_mmi.py                       # all, 1 thread (the shared test machine), ~2-4 min
    python bench/bench_mmi.py --threads=2 --only=mmfs
    python bench/bench_mmi.py --only=step --n=9 --baseline=HEAD~1   # training step before/after mmfs.py changes
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import world  # noqa: E402
from generate import generate  # noqa: E402
from mmi import MMI, MMIConfig, flatten_maps  # noqa: E402


def timeit(fn, n, warmup=1):
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def tiny_batch(model, tok, batch_size, seq_len, step=0):
    ds = data.SyntheticDataset(tok, model.cfg.n_image_tokens, seq_len, image_size=model.cfg.image_size)
    return ds.batch(step, batch_size)


def bench_step(args):
    torch.manual_seed(0)
    model = MMI(MMIConfig.from_name("tiny")).train()
    tok = model.tok
    batch = tiny_batch(model, tok, args.batch_size, args.seq_len)
    counts = model.param_counts()
    print(f"tiny: {sum(t for t, _ in counts.values()) / 1e6:.2f} M params "
          f"({', '.join(f'{k} {t / 1e6:.2f}' for k, (t, _) in counts.items() if t)})")
    lay = model.layout(batch["tokens"], batch["doc_ids"])
    print(f"batch: {tuple(batch['tokens'].shape)} tokens, {batch['images'].shape[0]} images "
          f"({int(lay.has_context.sum())} with image loss)")
    opt = torch.optim.AdamW(model.param_groups(0.05), fused=True)  # as train.py

    def step():
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    total = timeit(step, args.n)
    if args.baseline:  # before/after in this process: every MMFS module (LLM, U-Net taps, adapter) as of the revision
        import mmfs
        from bench_mmfs import load_baseline
        classes = {"mmfs": mmfs.MMFS, f"mmfs@{args.baseline}": load_baseline(args.baseline).MMFS}
        modules = [m for m in model.modules() if isinstance(m, mmfs.MMFS)]
        ms = {k: [] for k in classes}
        for _ in range(args.n):  # interleaved: a loaded machine slows both alike
            for k, cls in classes.items():
                for m in modules:
                    m.__class__ = cls
                c0 = time.process_time()  # process-CPU time: steadier than wall time on a shared machine
                step()
                ms[k].append(1000 * (time.process_time() - c0))
        for m in modules:
            m.__class__ = mmfs.MMFS
        ms = {k: sorted(v)[len(v) // 2] for k, v in ms.items()}
        base = ms[f"mmfs@{args.baseline}"]
        print(f"training step, interleaved medians of {args.n} (process-CPU ms): with mmfs@{args.baseline} {base:.0f} ms, with mmfs "
              f"{ms['mmfs']:.0f} ms ({ms['mmfs'] / base:.2f}x)")
        args.step_cpu_ms = ms["mmfs"], base

    # components, each forward + backward on detached inputs
    images, tokens = batch["images"], batch["tokens"]

    def vision():
        emb, maps = model.visual_tokenizer(images)
        (emb.sum() + sum(m.sum() for m in maps)).backward()
    emb, maps = model.visual_tokenizer(images)
    emb, maps = emb.detach(), [m.detach() for m in maps]
    values, shapes = flatten_maps(maps[1:])
    ctx = model.visual_context(lay, values, shapes, tokens.shape[0])

    def llm():
        h = model.llm.forward_hidden(embeds=model.embed(tokens, emb), ctx=ctx)
        tgt = model.text_targets(tokens)
        torch.nn.functional.cross_entropy(model.logits(h[:, :-1]).flatten(0, 1), tgt.flatten()).backward()
    h = model.llm.forward_hidden(embeds=model.embed(tokens, emb), ctx=ctx).detach()
    sel = lay.has_context.nonzero(as_tuple=True)[0]
    dec, dshapes = flatten_maps(maps)
    image_decoder = model.image_decoder

    def decoder():
        cond = image_decoder.condition(h, lay.rows[sel], lay.start[sel], lay.pos[sel])
        x0 = image_decoder.to_latent(images[sel])
        t = torch.randint(0, 1000, (len(sel),))
        ctx = image_decoder.context(dec, dshapes, lay.prev[sel])
        image_decoder.denoise(x0, t, cond, ctx).square().mean().backward()
    parts = {name: timeit(fn, args.n) for name, fn in [("vision", vision), ("llm", llm), ("decoder", decoder)]}
    print(f"training step (fwd+bwd+AdamW): {total * 1000:.0f} ms  = "
          + ", ".join(f"{k} {v * 1000:.0f} ms ({v / total:.0%})" for k, v in parts.items())
          + f", rest {(total - sum(parts.values())) * 1000:.0f} ms")
    # the optimiser alone, on the gradients left by the parts above: AdamW's loop over parameters against its fused
    # kernel (train.py uses the fused one on CPU and CUDA; the values agree to float rounding)
    opt_ms = {name: 1000 * timeit(torch.optim.AdamW(model.param_groups(0.05), fused=fused).step, 10 * args.n)
              for name, fused in [("per-parameter loop", False), ("fused", True)]}
    print("AdamW step alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in opt_ms.items()))
    return model, tok, total * 1000


def bench_generate(args, model=None, tok=None):
    if model is None:
        torch.manual_seed(0)
        model = MMI(MMIConfig.from_name("tiny"))
        tok = model.tok
    model.eval()
    prompt = [world.render(world.random_scene(__import__("random").Random(0)), model.cfg.image_size), "the red"]
    n, calls = 64, []
    plain = model.llm.forward_hidden
    model.llm.forward_hidden = lambda *a, **k: calls.append(1) or plain(*a, **k)  # count LLM calls (bench only)
    # min_length=n: a random model would stop at whatever </s> or BoI it draws first; time exactly n tokens
    dt = timeit(lambda: generate(model, prompt, max_new_tokens=n, max_images=0, temperature=0, min_length=n), args.n)
    del model.llm.forward_hidden
    n_tok = len(calls) // (args.n + 1)  # per run: one prefill + one call per further token
    print(f"text: {n_tok} tokens in {dt:.2f} s = {n_tok / dt:.0f} tokens/s (KV cache, greedy, after a prefill of "
          f"{model.cfg.n_image_tokens + 9} tokens with one image; mean of {args.n} runs after one warm-up)")
    tokens_per_s = n_tok / dt
    for steps, guidance in [(25, 3.5), (50, 3.5)]:
        t = time.perf_counter()
        out = generate(model, ["a red circle in the centre."], max_new_tokens=1, max_images=1, begin_image=True,
                       steps=steps, guidance=guidance, temperature=0, sampler="ddpm")
        dt = time.perf_counter() - t
        assert isinstance(out[0], torch.Tensor)
        print(f"image: {dt:.2f} s per image ({steps} DDPM steps, guidance {guidance} = batch 2 per step), "
              f"{1 / dt:.2f} images/s")
    return tokens_per_s


def bench_mmfs(args):
    """LLM forward (no grad) on a packed sequence with images, with vs without the MMFS layers."""
    configs = {
        "tiny": {},
        "medium": {"llm.dim": 1024, "llm.n_layers": 8, "llm.n_heads": 16, "llm.hidden_dim": 2816, "mmfs.every": 4,
                   "mmfs.heads": 16, "mmfs.head_dim": 64, "mmfs.points": 8, "n_image_tokens": 32,
                   "vision.hidden_size": 256, "vision.intermediate_size": 1024, "vision.num_attention_heads": 8,
                   "vision.image_size": 64, "adapter.n_heads": 8},
    }
    overhead = {}
    for name, over in configs.items():
        torch.manual_seed(0)
        model = MMI(MMIConfig.from_name("tiny", **over)).eval()
        tok = model.tok
        seq = args.seq_len if name == "tiny" else 512
        batch = tiny_batch(model, tok, args.batch_size if name == "tiny" else 2, seq)  # tiny: as in training
        tokens = batch["tokens"]
        with torch.no_grad():
            x, ctx, _, _ = model.llm_inputs(tokens, batch["images"], batch["doc_ids"])
            inserted = {i: b.inserted for i, b in enumerate(model.llm.layers) if b.inserted is not None}
            with_mmfs = timeit(lambda: model.llm.forward_hidden(embeds=x, ctx=ctx), args.n)
            for i in inserted:
                model.llm.layers[i].inserted = None
            without = timeit(lambda: model.llm.forward_hidden(embeds=x), args.n)
            for i, m in inserted.items():
                model.llm.layers[i].inserted = m
        p_mmfs = sum(p.numel() for n, p in model.llm.named_parameters() if ".inserted." in n)
        p_llm = sum(p.numel() for n, p in model.llm.named_parameters() if ".inserted." not in n)
        print(f"MMFS overhead {name}: LLM dim {model.llm.cfg.dim} x {model.llm.cfg.n_layers} layers, "
              f"MMFS in {len(inserted)}, batch {tuple(tokens.shape)} with {batch['images'].shape[0]} images: "
              f"{without * 1000:.0f} -> {with_mmfs * 1000:.0f} ms ({with_mmfs / without - 1:+.0%} runtime), "
              f"{p_mmfs / p_llm:+.1%} parameters")
        overhead[name] = with_mmfs / without - 1
    return overhead


def mmfs_flops(cfg: MMIConfig, T=2048, n_images=5):
    """Analytic multiply-adds per token: one LLM layer vs one MMFS layer (docs/official.md shapes), for the FLOPs ratio
    of the whole LLM. Images: levels 2-4 of the adapter = 21 x 21 base-grid cells (1344 values at 224 px)."""
    D, H, L = cfg.llm["dim"], cfg.llm["hidden_dim"], cfg.llm["n_layers"]
    M, hd, P, Dv = cfg.mmfs.heads, cfg.mmfs.head_dim, cfg.mmfs.points, cfg.vision["hidden_size"]
    g = cfg.vision["image_size"] // cfg.vision["patch_size"]
    S = (2 * g) ** 2 + g ** 2 + (g // 2) ** 2
    layer = 4 * D * D + 3 * D * H + T * D  # q/k/v/o, SwiGLU, attention over ~T/2 keys (scores + values)
    mmfs = (D * D + D * M * P * 2 + D * M * 3 * P + M * hd * D  # query, offsets, weights, output projections
            + n_images * 3 * P * M * hd * 5                     # bilinear samples (4 taps + weight) per image/level
            + n_images * S * Dv * M * hd / T)                   # value projection, shared by the T tokens
    n_mmfs = len(range(0, L, cfg.mmfs.every))
    return n_mmfs * mmfs / (L * layer)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--n", type=int, default=3, help="timed repetitions")
    ap.add_argument("--only", choices=["step", "generate", "mmfs"], default=None)
    ap.add_argument("--baseline", help="git revision: also time the training step with mmfs.py's MMFS of that "
                    "revision, interleaved in this process (e.g. HEAD~1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    model = tok = None
    summary = {}
    if args.only in (None, "step"):
        model, tok, summary["step_ms"] = bench_step(args)
        if args.baseline:
            summary["step_cpu_ms"], summary["step_cpu_ms_baseline"] = args.step_cpu_ms
    if args.only in (None, "generate"):
        summary["text_tokens_per_s"] = bench_generate(args, model, tok)
    if args.only in (None, "mmfs"):
        summary["mmfs_overhead_tiny"] = bench_mmfs(args)["tiny"]
        flops = mmfs_flops(MMIConfig.from_name("official"))
        print(f"MMFS FLOPs in the LLM, analytic (T=2048, 5 images): official {flops:+.1%} "
              "(paper: ~+2% FLOPs, +6% runtime with OpenLLaMA-3B and the CUDA op)")
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
