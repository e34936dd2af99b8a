"""
Memory plan of one training step or one interleaved generation, without a GPU and without weights: the model is built
on the meta device, its tensors made fake (torch's FakeTensorMode: shapes and dtypes, no storage), and the step runs
for real on them under torch's module-level memory tracker (torch.distributed._tools.mem_tracker.MemTracker), which
sees every tensor made and freed and keeps the peak, split into weights, gradients, optimiser state and activations.

    python bench/memory.py --preset=official --mode=train --batch_size=2 --seq_len=2048 --dtype=bfloat16 \\
        --grad_checkpointing=True                                  # the paper's training, one GPU, plan only
    python bench/memory.py --preset=official --mode=generate --dtype=float16 --quantize=int8   # released model
    python bench/memory.py --llm=7b --mode=train --batch_size=4 --seq_len=1024   # Vicuna-7B instead of 13B
    python bench/memory.py --llm_layers=8 --llm_dim=512 ...        # any LLaMA-family size (--llm_heads, ...)
    python bench/memory.py --check                 # the method against the same tracker on real CPU tensors
    python bench/memory.py --table                 # which configurations fit 24 / 40 / 80 GB cards
    python bench/memory.py --measure ...           # CUDA: also run the step for real, torch.cuda.max_memory_allocated

Which tensors stay real: the token ids and everything computed from them alone (image layout, visibility masks,
targets, indices) and small tensors made from nothing (positions, timesteps). The model reads those to decide what
to compute (how many images, which tokens see which image), as on a GPU; they are a few KB. Everything else
(weights, activations, caches, noise) is fake. The plan follows the CUDA code paths where they differ from the CPU's
(--target=cuda, default): the MMFS op is the kernel's autograd function (output and the inputs it saves, no
intermediates), and attention is flash-style (no T x T matrix) on both. Not in the plan: the CUDA context (~0.5 GB,
outside max_memory_allocated), cuBLAS workspaces and allocator fragmentation; the table keeps 10% of each card free
for them.
"""
import argparse
import contextlib
import os
import sys
import time
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmfs  # noqa: E402
import mmfs_kernel  # noqa: E402
import generate  # noqa: E402
from diffusion import NoiseSchedule  # noqa: E402
from llm import LLaMA, LLaMAConfig  # noqa: E402
from mmi import MMI, MMIConfig  # noqa: E402
from quant import quantize_int8  # noqa: E402
import vit  # noqa: E402
from vit import CLIPVisionConfig, VisionTransformer  # noqa: E402

GiB = 2**30
# LLaMA-family language models by size (config.json values of the public checkpoints)
LLMS = {
    "13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=2048),  # Vicuna
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=2048),   # Vicuna
    "1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
               max_seq_len=2048),                                                                      # TinyLlama
}
# A mid-size configuration of the tiny world's classes (width 512, 8 LLM layers): the --check's second case
MID = {"vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      patch_size=8, image_size=64, layer_norm_eps=1e-5, num_channels=3, hidden_act="quick_gelu"),
       "llm": dict(vocab_size=440, dim=512, n_layers=8, n_heads=8, hidden_dim=1408, norm_eps=1e-5, max_seq_len=512),
       "unet": dict(in_channels=3, out_channels=3, block_out_channels=[64, 128, 128], layers_per_block=1,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    attention_head_dim=[4, 4, 4], cross_attention_dim=256, norm_num_groups=16, sample_size=64),
       "n_image_tokens": 32, "image_size": 64, "resampler.dim": 256, "resampler.heads": 4, "resampler.ffn": 1024,
       "decoder.dim": 256, "decoder.heads": 4, "decoder.ffn": 1024, "decoder.queries": 32, "mmfs.every": 2}
# Where each weight belongs (first match wins), for the per-component table
COMPONENTS = [
    ("ViT", lambda n: n.startswith("visual_tokenizer.adapter.vit.")),
    ("ViT-Adapter", lambda n: n.startswith("visual_tokenizer.adapter.")),
    ("image resampler", lambda n: n.startswith("visual_tokenizer.")),  # projection, norms, resampler
    ("LLM MMFS", lambda n: ".inserted." in n),
    ("LLM", lambda n: n.startswith(("llm.", "boi", "new_head.", "head_bias"))),
    ("U-Net MMFS", lambda n: n.startswith("image_decoder.taps.")),
    ("U-Net", lambda n: n.startswith("image_decoder.unet.")),
    ("VAE", lambda n: n.startswith("image_decoder.vae.")),
    ("decoder resampler", lambda n: n.startswith("image_decoder.")),  # context projection, resampler, null cond.
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAKE_MIN_NUMEL = 4096  # a floating tensor made from nothing (zeros, randn) at least this big is made fake


# -----------------------------------------------------------------------------
# Configuration and model

def config(preset="official", llm=None, mmfs_every=None, **overrides) -> MMIConfig:
    """The preset with the LLM of `llm` (a LLMS key or LLaMAConfig fields); MMFS every mmfs_every layers, by default
    as the paper relative to depth (every 4th of 40 layers: 10 MMFS layers at any depth)."""
    llm = LLMS[llm] if isinstance(llm, str) else llm
    if llm:
        overrides["llm"] = {**MMIConfig.from_name(preset).llm, **llm}
        mmfs_every = mmfs_every or overrides.get("mmfs.every") or max(1, round(llm["n_layers"] / 10))
    if mmfs_every:
        overrides["mmfs.every"] = mmfs_every
    return MMIConfig.from_name(preset, **overrides)


def build_meta(cfg: MMIConfig, mode, dtype, quantize=None) -> MMI:
    """The model as train.py / sample.py hold it, on the meta device. Training the official way (components): ViT and
    LLM in `dtype`, the rest fp32 under autocast (from_components); the tiny way: all fp32 under autocast.
    Generation: everything in `dtype` (sample.py). quantize="int8": the frozen Linear layers of the LLM."""
    with torch.device("meta"):
        tower = VisionTransformer(CLIPVisionConfig(**cfg.vision))
        lm = LLaMA(LLaMAConfig(**cfg.llm))
        if mode == "train" and cfg.freeze_llm:  # official components: loaded in dtype (from_components)
            tower, lm = tower.to(dtype), lm.to(dtype)
        model = MMI(cfg, vit=tower, llm=lm)
    if mode == "generate":
        model = model.to(dtype).eval()
        model.requires_grad_(False)
    else:
        model.train()
    if quantize == "int8":
        # the frozen LLM's Linear layers; MMFS stays as it is (it trains, and reads its own weights directly)
        if not quantize_int8(model.llm, filter=lambda n, lin: ".inserted." not in n and not (
                mode == "train" and lin.weight.requires_grad)):
            raise SystemExit("error: --quantize=int8: the LLM has no frozen Linear layer (preset trains it)")
    elif quantize:
        raise SystemExit(f"error: --quantize={quantize}: only int8")
    # the model's tokenizer only gives the special ids here: the batches are made of ids directly
    model.tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, boi_id=cfg.boi_id, image_id=cfg.image_id,
                                encode=lambda text, bos=False, eos=False: [5] * len(text.split()),
                                decode=lambda ids: "")
    # the noise schedule real (not meta): sampling reads its tables on the host (.item(), .tolist())
    model.image_decoder.schedule = NoiseSchedule(**cfg.schedule)
    return model


def materialise(model, device, fake_mode=None):
    """Meta tensors -> fake tensors (fake_mode) or real ones on `device`, filled with small random values (their
    values do not change the memory; they must only stay finite)."""
    with fake_mode or contextlib.nullcontext():
        model.to_empty(device=device)
    if fake_mode is None:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.normal_(0, 0.02) if t.is_floating_point() else t.random_(-8, 8)
    model.llm._init_buffers() if fake_mode is None else None  # the rotary tables (fake: any values)
    return model


def weight_table(model):
    """{(component, dtype): [bytes, trainable bytes]}; each storage once (tied weights are one matrix)."""
    rows, seen = {}, set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        comp = next(c for c, test in COMPONENTS if test(name))
        row = rows.setdefault((comp, str(t.dtype).removeprefix("torch.")), [0, 0])
        row[0] += t.numel() * t.element_size()
        row[1] += t.numel() * t.element_size() if t.requires_grad else 0
    return rows


# -----------------------------------------------------------------------------
# The steps (the same code runs on fake and on real tensors)

def make_batch(model, batch_size, seq_len, images_per_row, device):
    """Rows of <s> text <BoI> <|image|>*n text ... </s>, images_per_row images spread evenly, padded to seq_len;
    images at the ViT's size and (images_dec) at the decoder's, as data.py / the official loader give them."""
    cfg, tok = model.cfg, model.tok
    n = cfg.n_image_tokens
    text = (seq_len - 2 - images_per_row * (n + 1)) // (images_per_row + 1)
    if text < 1:
        raise SystemExit(f"error: {images_per_row} images of {n + 1} tokens do not fit in seq_len={seq_len}")
    row = [tok.bos_id]
    for _ in range(images_per_row):
        row += [5] * text + [cfg.boi_id] + [cfg.image_id] * n
    row += [5] * text + [tok.eos_id]
    row += [tok.pad_id] * (seq_len - len(row))
    N, vis = batch_size * images_per_row, cfg.vision["image_size"]
    return dict(tokens=torch.tensor([row] * batch_size, device=device),
                images=torch.rand(N, 3, vis, vis, device=device),
                images_dec=torch.rand(N, 3, cfg.image_size, cfg.image_size, device=device))


def train_step(model, batch, optimizer, autocast_dtype, device_type):
    """One step as train.py runs it: forward under autocast, backward, clip, AdamW, zero_grad(set_to_none)."""
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype != torch.float32 \
        else contextlib.nullcontext()
    with amp:
        loss = model(batch)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def new_optimizer(model, fused):
    """AdamW on model.param_groups with its two states already made: the plan is of a step in the steady state."""
    opt = torch.optim.AdamW(model.param_groups(0.05), fused=fused)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def generate_step(model, max_len, prompt_text=32, new_text=4, steps=2, guidance=7.5, device="cpu"):
    """One interleaved round of generate.generate with its token choices scripted (the logits are fake): a prompt of
    a picture and prompt_text words, new_text tokens decoded one by one, then a BoI: the decoder draws the picture
    (classifier-free guidance: the U-Net runs on 2; `steps` denoising steps, each the same memory), it is encoded
    back, its image tokens fed, and </s>. The KV cache holds max_len positions from the start, as generate makes it."""
    cfg, tok = model.cfg, model.tok
    script = iter([5] * new_text + [cfg.boi_id, tok.eos_id])
    pick = lambda *a, **k: torch.tensor([next(script)])  # noqa: E731
    vis = cfg.vision["image_size"]
    prompt = [torch.rand(3, vis, vis, device=device), " ".join(["word"] * prompt_text)]
    with patched(generate, "sample_next", pick):
        generate.generate(model, prompt, max_new_tokens=new_text + 1, max_images=1, max_len=max_len, steps=steps,
                          sampler="ddim", guidance=guidance)


# -----------------------------------------------------------------------------
# Fake tensors where the model is, real ones where the model reads values

class FakeExceptTokens(TorchDispatchMode):
    """Every op that touches a fake tensor runs in fake_mode; so does a floating tensor made from nothing
    (FAKE_MIN_NUMEL or more: caches, noise). The rest runs for real: ops on token ids and on what derives from them
    alone, and new_* integer / bool tensors (e.g. an all-true visibility mask made from a fake tensor: the model
    tests it with .all())."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        if fake and func.overloadpacket.__name__.startswith("new_") and not _floating(kwargs, args[0]):
            args = (torch.empty(0, dtype=args[0].dtype), *args[1:])  # made from a real stand-in: stays real
            fake = False
        if not tensors:  # made from nothing: fake when floating and big
            with self.fake:
                out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() >= FAKE_MIN_NUMEL:
                return out
        if fake:
            if func.overloadpacket in _INDEXING:  # a real bool mask as its indices: fake ones have no known count
                args = (args[0], _long_indices(args[1]), *args[2:])
            with self.fake:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


_INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_}


def _long_indices(indices):
    out = []
    for i in indices:
        real_mask = i is not None and not isinstance(i, FakeTensor) and i.dtype == torch.bool
        out += list(i.nonzero(as_tuple=True)) if real_mask else [i]
    return out


def _floating(kwargs, like):
    dtype = kwargs.get("dtype") or like.dtype
    return dtype.is_floating_point


def emulate_cuda_kernel():
    """mmfs.deform_attn as on a GPU: the kernel's autograd function (mmfs_kernel._DeformAttn), whose launches do
    nothing here; its memory is what it allocates and saves (the output, the fp32 inputs, their gradients)."""
    def op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        args = mmfs_kernel._prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return mmfs_kernel._DeformAttn.apply(lambda *a: None, lambda n: (1, 1), *args).to(value.dtype)
    return op


class Tracker(MemTracker):
    """torch's MemTracker, told that frozen parameters get no gradient: it hooks every parameter's gradient, and
    registering a hook on one that does not require grad raises. A placeholder handle marks them as hooked."""

    def track_external(self, *external):
        for obj in external:
            for p in obj.parameters() if isinstance(obj, torch.nn.Module) else ():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        super().track_external(*external)

    def _update_peak_stats(self, peak_state):
        # Only the global peak: torch's also updates every module's own peak, a loop over all modules after every
        # op that made tracing the official model take minutes; the plan uses the global peak only.
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class _Step(torch.nn.Module):
    """Generation as one module call: MemTracker refuses a module called twice at the top level (it takes that for a
    second iteration), and generation calls the LLM once per token."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self):
        self.fn()


class _NoHook:
    def remove(self):
        pass


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# -----------------------------------------------------------------------------
# Plan and measurement

def run(cfg, mode, dtype, batch_size=1, seq_len=None, images_per_row=None, grad_checkpointing=False,
        quantize=None, target="cuda", fake=True, device="cpu", steps=2):
    """Build the model (fake or real on `device`), run one step under MemTracker -> dict: peak bytes, the tracker's
    split at the peak, the weights table, seconds. target: whose code paths the plan follows (see module doc)."""
    t0 = time.time()
    for cached in (vit._sincos_table, vit._resized_table):  # host-side position tables: made inside every run alike
        getattr(cached, "cache_clear", lambda: None)()
    seq_len = seq_len or cfg.llm["max_seq_len"]
    if images_per_row is None:  # the official MMC4 rows: 6 images per 2048 tokens
        images_per_row = max(1, round(6 * seq_len / 2048))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model = materialise(build_meta(cfg, mode, dtype, quantize), device, fake_mode)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    fused = target == "cuda" or device != "cpu"  # train.py: fused AdamW on CUDA
    kernel = patched(mmfs, "deform_attn", emulate_cuda_kernel()) if fake and target == "cuda" \
        else contextlib.nullcontext()
    with FakeExceptTokens(fake_mode) if fake else contextlib.nullcontext(), kernel:
        if mode == "train":
            optimizer = new_optimizer(model, fused)
            batch = make_batch(model, batch_size, seq_len, images_per_row, device)  # images: fake (big, floating)
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        mt = Tracker()
        mt.track_external(model, *([optimizer, *batch.values()] if mode == "train" else []))
        if mode == "train":  # not inside a _Step: backward inside a module's call confuses the tracker
            step = lambda: train_step(model, batch, optimizer, dtype, "cuda" if device != "cpu" else "cpu")  # noqa
        else:
            step = _Step(lambda: generate_step(model, seq_len, steps=steps, device=device))
        with mt:
            step()
    peak = mt.get_tracker_snapshot("peak")
    split = {}
    for dev_snap in peak.values():
        for k, v in dev_snap.items():
            key = getattr(k, "value", k)
            split[key] = split.get(key, 0) + v
    out = dict(peak=split.get("Total", 0), split=split, weights=weight_table(model), seconds=time.time() - t0,
               images_per_row=images_per_row, seq_len=seq_len)
    if device != "cpu":
        out["measured"] = torch.cuda.max_memory_allocated()  # weights and optimiser included, as in the plan
    return out


def gb(b):
    return f"{b / GiB:.2f}"


def report(res, args):
    print(f"plan of one {'training step' if args.mode == 'train' else 'interleaved generation'}: {args.describe}")
    print(f"  {'component':<18} {'dtype':<9} {'weights GiB':>11} {'trainable':>10}")
    for (comp, dt), (b, tr) in sorted(res["weights"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {comp:<18} {dt:<9} {gb(b):>11} {gb(tr):>10}")
    s = res["split"]
    weights = s.get("Parameter", 0) + s.get("Buffer", 0)
    acts = s.get("Activation", 0) + s.get("Temp", 0) + s.get("Other", 0)
    print(f"  peak {gb(res['peak'])} GiB = weights {gb(weights)} + gradients {gb(s.get('Gradient', 0))} + optimiser "
          f"{gb(s.get('Optstate', 0))} + activations {gb(acts)} (of which temporaries of backward "
          f"{gb(s.get('Temp', 0))}, inputs {gb(s.get('Other', 0))})   [traced in {res['seconds']:.1f} s]")
    if "measured" in res:
        print(f"  measured torch.cuda.max_memory_allocated {gb(res['measured'])} GiB, plan {gb(res['peak'])} GiB "
              f"({100 * (res['peak'] / res['measured'] - 1):+.1f}% plan vs measured; the tracker on the real CUDA "
              f"tensors: {gb(res['tracked'])} GiB)")


# -----------------------------------------------------------------------------
# The method checked: plan (fake tensors) vs the same tracker on real CPU tensors

CHECKS = {  # name -> (preset, overrides, batch_size, seq_len)
    "tiny": ("tiny", {}, 2, 128),
    "mid": ("tiny", MID, 2, 256),
}


def check(name, mode, dtype=torch.float32, grad_checkpointing=False):
    """(plan, real) of the same step on the CPU code paths: plan on fake tensors, real on CPU tensors."""
    preset, over, B, T = CHECKS[name]
    cfg = config(preset, **over)
    kw = dict(batch_size=B, seq_len=T, grad_checkpointing=grad_checkpointing, target="cpu")
    return [run(cfg, mode, dtype, fake=f, **kw) for f in (True, False)]


# -----------------------------------------------------------------------------
# The table: which configurations fit 24 / 40 / 80 GB cards

CARDS = (24, 40, 80)
USABLE = 0.9  # of a card's memory for the plan; the rest: CUDA context, workspaces, fragmentation


def fits(peak, card):
    return peak <= USABLE * card * GiB


def train_fits(cfg, quantize):
    """Per card: the largest power-of-two batch (<= 64) and the longest context (2048, 1024, 512) whose plan fits.
    Activations grow linearly with the batch: the plans at batch 1 and 2 give the rest (at that context)."""
    cells, first = {}, None
    for T in (2048, 1024, 512):
        left = [c for c in CARDS if c not in cells]
        if not left:
            break
        one = run(cfg, "train", torch.bfloat16, batch_size=1, seq_len=T, grad_checkpointing=True, quantize=quantize)
        first = first or one
        if not any(fits(one["peak"], c) for c in left):
            continue
        per_row = run(cfg, "train", torch.bfloat16, batch_size=2, seq_len=T, grad_checkpointing=True,
                      quantize=quantize)["peak"] - one["peak"]
        for c in left:
            if fits(one["peak"], c):
                b = 1
                while b < 64 and fits(one["peak"] + (2 * b - 1) * per_row, c):
                    b *= 2
                cells[c] = f"{b} x {T} ({one['images_per_row']} img/row), {gb(one['peak'] + (b - 1) * per_row)}"
    return [cells.get(c, "no") for c in CARDS], first


def table():
    """The table of bench/README.md (markdown) on stdout; progress on stderr."""
    rows = []
    gen = [("(a) released checkpoint (Vicuna-13B), fp16", "13b", None),
           ("(a) released checkpoint (Vicuna-13B), fp16, int8 LLM", "13b", "int8"),
           ("(c) ViT-L/14 + Vicuna-7B + SD 2.1-base, fp16", "7b", None),
           ("(c) ViT-L/14 + Vicuna-7B + SD 2.1-base, fp16, int8 LLM", "7b", "int8"),
           ("(c) ViT-L/14 + ~1B LLaMA (TinyLlama) + SD 2.1-base, fp16", "1b", None)]
    for what, llm, q in gen:
        res = run(config("official", llm=llm), "generate", torch.float16, seq_len=2048, quantize=q)
        cells = [f"1 x 2048, {gb(res['peak'])}" if fits(res["peak"], c) else "no" for c in CARDS]
        flags = f"--mode=generate --llm={llm} --dtype=float16 --seq_len=2048" + (f" --quantize={q}" if q else "")
        rows.append((f"generate: {what}", res["peak"], cells, flags))
        print(f"  {rows[-1][0]}: {gb(res['peak'])} GiB", file=sys.stderr, flush=True)
    train = [("(b) paper configuration: Vicuna-13B, ViT and LLM frozen", "13b", None),
             ("(b) paper configuration, int8 LLM", "13b", "int8"),
             ("(c) Vicuna-7B", "7b", None), ("(c) Vicuna-7B, int8 LLM", "7b", "int8"),
             ("(c) ~1B LLaMA (TinyLlama)", "1b", None)]
    for what, llm, q in train:
        cells, first = train_fits(config("official", llm=llm), q)
        flags = f"--mode=train --llm={llm} --dtype=bfloat16 --grad_checkpointing=True --batch_size=1 " \
                f"--seq_len={first['seq_len']}" + (f" --quantize={q}" if q else "")
        rows.append((f"train: {what}", first["peak"], cells, flags))
        print(f"  {rows[-1][0]}: {cells}", file=sys.stderr, flush=True)
    print("| configuration | plan, batch 1 (GiB) | 24 GB | 40 GB | 80 GB | status | bench/memory.py flags (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    for what, peak, cells, flags in rows:
        print(f"| {what} | {gb(peak)} | {' | '.join(cells)} | planned | `{flags}` |")


# -----------------------------------------------------------------------------

def parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="official", choices=["official", "tiny"])
    p.add_argument("--mode", default="train", choices=["train", "generate"])
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=None, help="rows (train) / KV cache (generate); default: the LLM's")
    p.add_argument("--images_per_row", type=int, default=None, help="default: 6 per 2048 tokens (official MMC4)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--grad_checkpointing", type=parse_bool, default=False)
    p.add_argument("--quantize", default=None, choices=["int8"])
    p.add_argument("--llm", default=None, choices=list(LLMS), help="LLaMA-family size (default: the preset's)")
    for f in ("layers", "dim", "heads", "kv_heads", "ffn"):
        p.add_argument(f"--llm_{f}", type=int, default=None)
    p.add_argument("--mmfs_every", type=int, default=None, help="default: n_layers / 10 with --llm (paper: 4 of 40)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps traced (each takes the same memory)")
    p.add_argument("--target", default="cuda", choices=["cuda", "cpu"], help="whose code paths the plan follows")
    p.add_argument("--check", action="store_true", help="tiny and mid-size: plan vs the tracker on real CPU tensors")
    p.add_argument("--table", action="store_true", help="the table of 24 / 40 / 80 GB cards (bench/README.md)")
    p.add_argument("--measure", action="store_true", help="CUDA: run the step for real, max_memory_allocated")
    args = p.parse_args(argv)
    if args.measure and not torch.cuda.is_available():
        raise SystemExit("error: --measure needs a CUDA device (torch.cuda.is_available() is False)")
    if args.check:
        torch.set_num_threads(1)
        for name in CHECKS:
            for mode in ("train", "generate"):
                plan, real = check(name, mode)
                print(f"check {name:<4} {mode:<8}: plan {plan['peak'] / 2**20:8.1f} MiB, real CPU tensors "
                      f"{real['peak'] / 2**20:8.1f} MiB, {100 * (plan['peak'] / real['peak'] - 1):+.2f}% "
                      f"[{plan['seconds']:.1f} s / {real['seconds']:.1f} s]", flush=True)
        return
    if args.table:
        table()
        return
    llm = dict(LLMS[args.llm]) if args.llm else {}
    for f, key in (("layers", "n_layers"), ("dim", "dim"), ("heads", "n_heads"), ("kv_heads", "n_kv_heads"),
                   ("ffn", "hidden_dim")):
        if getattr(args, f"llm_{f}") is not None:
            llm[key] = getattr(args, f"llm_{f}")
    cfg = config(args.preset, llm=llm or None, mmfs_every=args.mmfs_every)
    dtype = DTYPES[args.dtype]
    kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, images_per_row=args.images_per_row,
              grad_checkpointing=args.grad_checkpointing, quantize=args.quantize, target=args.target,
              steps=args.steps)
    args.describe = f"{args.preset}, LLM {cfg.llm['n_layers']} layers x {cfg.llm['dim']} (MMFS every " \
                    f"{cfg.mmfs.every}), {args.dtype}" + (", int8 LLM" if args.quantize else "") + \
                    (f", batch {args.batch_size}" if args.mode == "train" else "") + \
                    (", grad checkpointing" if args.grad_checkpointing else "")
    res = run(cfg, args.mode, dtype, **kw)
    if args.measure:
        total = torch.cuda.get_device_properties(0).total_memory
        if res["peak"] > 0.95 * total:
            report(res, args)
            raise SystemExit(f"skipped the measurement: the plan ({gb(res['peak'])} GiB) exceeds this card "
                             f"({gb(total)} GiB)")
        real = run(cfg, args.mode, dtype, fake=False, device="cuda", **kw)
        res["measured"], res["tracked"] = real["measured"], real["peak"]
    report(res, args)


if __name__ == "__main__":
    main()
