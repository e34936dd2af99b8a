"""
Benchmark llm.py against transformers on the CPU, and measure peak memory while loading a large checkpoint.

    python bench/bench_llm.py                  # speed (random ~200M config) + load memory (~2.2 GB fp16 checkpoint)
    python bench/bench_llm.py --skip-memory    # speed only
    python bench/bench_llm.py --memory-only

Speed: same weights, same input, one run: forward tokens/s (prefill of B x T) and KV-cache greedy decode tokens/s,
ours / transformers (goal: ratio of times <= 1.0, i.e. at least as fast). Best of a few repeats (shared CPUs).
Memory: a random LLaMA is written to a temp folder as fp16 shards (safetensors, then pytorch_model-*.bin), loaded by
LLaMA.from_pretrained in a fresh subprocess; peak RSS (ru_maxrss) / bytes on disk (goal <= 1.2). Files are deleted.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm import LLaMA, LLaMAConfig, hf_to_ours  # noqa: E402

SPEED_HF = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5, max_position_embeddings=1024)
BIG_HF = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=2048)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn_ours, fn_ref, repeats):
    """Best time of each, ours and theirs alternating so a change in machine load hits both alike."""
    fn_ours(), fn_ref()  # warm-up
    times = [(fn_ours(), fn_ref()) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


@torch.inference_mode()
def bench_speed(B=1, T=128, steps=16, kv_heads=None, repeats=5):
    import transformers

    hf_cfg = dict(SPEED_HF, num_key_value_heads=kv_heads or SPEED_HF["num_key_value_heads"])
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa")).eval()
    ours = LLaMA(LLaMAConfig.from_hf(hf_cfg)).eval()
    ours.load_state_dict({hf_to_ours(k): v for k, v in ref.state_dict().items()})
    n_params = sum(p.numel() for p in ours.parameters())
    x = torch.randint(0, hf_cfg["vocab_size"], (B, T))
    torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-4, rtol=1e-4)

    def decode_ours():
        cache = ours.new_cache(B, T + steps)
        nxt = ours(x, cache=cache)[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = ours(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    def decode_ref():
        out = ref(x, use_cache=True)
        nxt, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        t0 = time.perf_counter()
        for _ in range(steps):
            out = ref(nxt, past_key_values=past, use_cache=True)
            nxt, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        return time.perf_counter() - t0

    fwd_ours, fwd_ref = best_of(lambda: timed(lambda: ours(x)), lambda: timed(lambda: ref(x)), repeats)
    dec_ours, dec_ref = best_of(decode_ours, decode_ref, repeats)
    print(f"speed: {n_params / 1e6:.0f}M params, n_kv_heads={hf_cfg['num_key_value_heads']}, fp32, "
          f"B={B} T={T}, {steps} decode steps, best of {repeats}, torch threads={torch.get_num_threads()}", flush=True)
    print(f"  forward  ours {B * T / fwd_ours:8.1f} tok/s   transformers {B * T / fwd_ref:8.1f} tok/s   "
          f"time ratio ours/theirs {fwd_ours / fwd_ref:.2f}")
    print(f"  decode   ours {B * steps / dec_ours:8.1f} tok/s   transformers {B * steps / dec_ref:8.1f} tok/s   "
          f"time ratio ours/theirs {dec_ours / dec_ref:.2f}", flush=True)


def write_random_checkpoint(folder, hf_cfg, fmt, shard_bytes=1 << 30):
    """Random fp16 LLaMA in the HF layout, written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file

    c = LLaMAConfig.from_hf(hf_cfg)
    D, F, V, kv = c.dim, c.hidden_dim, c.vocab_size, c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
                       p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F), p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,)})
    shapes.update({"model.norm.weight": (D,), "lm_head.weight": (V, D)})
    groups, cur, size = [], [], 0  # keys grouped into shards of ~shard_bytes
    for k, s in shapes.items():
        cur.append(k)
        size += 2 * torch.Size(s).numel()
        if size >= shard_bytes:
            groups.append(cur)
            cur, size = [], 0
    groups += [cur] if cur else []
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for n, keys in enumerate(groups):
        name = f"{stem}-{n + 1:05d}-of-{len(groups):05d}.{ext}"
        sd = {k: (torch.randn(shapes[k], generator=g) * 0.02).half() for k in keys}
        if fmt == "bin":
            sd.update({f"{k.rsplit('.self_attn', 1)[0]}.self_attn.rotary_emb.inv_freq": torch.ones(c.head_dim // 2)
                       for k in keys if k.endswith("q_proj.weight")})
            torch.save(sd, os.path.join(folder, name))
        else:
            save_file(sd, os.path.join(folder, name))
        weight_map.update({k: name for k in sd})
        del sd
    with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(hf_cfg, model_type="llama"), f)


def peak_rss() -> int:
    """Peak resident set of this process in bytes. VmHWM is per address space; ru_maxrss would also count the
    parent's RSS at fork time, which Linux carries across exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def load_child(folder):
    """Run in a fresh process: load, touch every weight, report peak RSS in bytes."""
    t0 = time.perf_counter()
    m = LLaMA.from_pretrained(folder)
    seconds = time.perf_counter() - t0
    after_load = peak_rss()
    # touch every weight (mmap'd .bin tensors are only read on use), in chunks so no large temporary is made
    total = sum(float(c.sum(dtype=torch.float32)) for p in m.parameters() for c in p.detach().view(-1).split(1 << 20))
    peak = peak_rss()
    print(json.dumps({"peak": peak, "after_load": after_load, "seconds": seconds, "dtype": str(m.embed.weight.dtype), "sum": total}))


def bench_memory(tmp_root=None):
    for fmt in ("safetensors", "bin"):
        folder = tempfile.mkdtemp(prefix=f"mmi_llm_{fmt}_", dir=tmp_root)
        try:
            write_random_checkpoint(folder, BIG_HF, fmt)
            disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
            base = subprocess.run([sys.executable, __file__, "--baseline-child"], capture_output=True, text=True,
                                  check=True)
            out = subprocess.run([sys.executable, __file__, "--load-child", folder], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            baseline = int(base.stdout.strip())
            print(f"memory ({fmt}, sharded fp16 -> {r['dtype']}): on disk {disk / 2**30:.2f} GiB, "
                  f"peak RSS {r['peak'] / 2**30:.2f} GiB (of which {baseline / 2**30:.2f} GiB is python+torch "
                  f"before loading), ratio {r['peak'] / disk:.2f}, "
                  f"excluding the import baseline {(r['peak'] - baseline) / disk:.2f}; load {r['seconds']:.1f} s "
                  f"(peak at the end of from_pretrained {r['after_load'] / 2**30:.2f} GiB)", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--load-child")
    ap.add_argument("--baseline-child", action="store_true")
    ap.add_argument("--tmp", default=None, help="where to write the temporary checkpoint (default: $TMPDIR)")
    args = ap.parse_args()
    if args.baseline_child:
        print(peak_rss())
    elif args.load_child:
        load_child(args.load_child)
    else:
        if not args.memory_only:
            bench_speed()
            bench_speed(kv_heads=4)
        if not args.skip_memory:
            bench_memory(args.tmp)
