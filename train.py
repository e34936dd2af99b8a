"""
Train MM-Interleaved: the tiny model on the synthetic world (default), or the official one on real corpora.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py   # tiny preset, synthetic world, on the
        # tiny Stable Diffusion assets/tiny-sd (tiny_sd.py), the paper's two losses (2 processes of 1 thread beat 1
        # process of 2). The shipped assets/tiny is two runs (a tiny-only distillation stage, then this with the
        # distillation kept): assets/make_tiny.sh, and its times in README.md
    python train.py --grad_accum=2                    # the same run in one process (same global batch), slower
    python train.py --warm_steps=1500 --diffusion=False --distill_weight=1   # the distillation stage (distill.py)
    python train.py --sd_path= --kinds=i2t:0.7,qa:0.1,t2i:0.1,story:0.1 --max_steps=1550   # all from scratch
    python train.py --max_steps=50 --eval_interval=25 --out_dir=out-try     # a short try
    python train.py --eval_only=True --init_from=assets/tiny --eval_n=100  # held-out scores as one JSON line
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --eval_only=True --init_from=assets/tiny
        # the same scores, the held-out examples split between 2 processes (each example has its own noise)
    python train.py --out_dir=out-tiny --resume=True  # continue exactly where the last checkpoint stopped
    python train.py --n_image_tokens=8 --llm.n_layers=6                    # model-config overrides (mmi.MMIConfig)
    torchrun --standalone --nproc_per_node=2 train.py # DDP (gloo on CPU, NCCL on GPUs); same result as 1 process
    torchrun --standalone --nproc_per_node=8 train.py --preset=official --clip_path=clip-vit-large-patch14 \\
        --llm_path=vicuna-13b-v1.3 --sd_path=stable-diffusion-2-1-base --data=mmc4.jsonl,laion.jsonl \\
        --device=cuda --dtype=bfloat16 --grad_checkpointing=True

Every knob below can be overridden as --key=value (checked against the knob's type; booleans accept
True/False/1/0/yes/no). A key that is not a knob goes to the model config: a field of mmi.MMIConfig or
"sub.field" of one of its sub-configs (values parsed as Python literals).

Determinism: micro-batch g (g = (step * grad_accum + micro) * world_size + rank) always holds the same rows of the
synthetic world and reseeds torch's RNG (diffusion noise, timesteps, null-condition drops) from (seed, g). So a run
depends only on the micro-batch size and the global batch, not on the number of processes, and resuming is exact.

Corpora (--data=a.jsonl,b.jsonl): bad lines are skipped and counted, per epoch and in all (printed and in
log.jsonl); a corpus with nothing usable stops the run at once. Ctrl-C stops with one line naming the last good
checkpoint; a checkpoint being written is finished first (ckpt.pt and model.safetensors always match).
"""
import functools
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import cli
import data
import distill
import world
from generate import SAMPLING, draw_image, generate
from mmi import PRESETS
from quant import quantize_int8
from tiny_sd import TextEncoder
from weights import CheckpointError

# -----------------------------------------------------------------------------
# knobs (defaults for the tiny preset; PRESET_KNOBS below changes some for other presets)
preset = "tiny"
out_dir = "out-tiny"
seed = 0
resume = False
# data: "" = the synthetic world of world.py; else comma-separated .jsonl corpora (data.CorpusDataset)
data_paths = ""
kinds = "i2t:0.25,qa:0.15,t2i:0.35,story:0.25"  # synthetic document mixture (documents, not compute: see README)
story_min_shapes = 1       # the fewest objects in a synthetic story's first scene (1: the world's own mix)
seq_len = 128              # tiny: short rows; MMFS samples every image of a row for every token of it
batch_size = 4             # rows per micro-batch per process
grad_accum = 1             # micro-batches per step per process; global batch = batch_size * grad_accum * world_size
num_workers = 0
# optimisation: AdamW on model.param_groups (per-group lr from the model config, scaled by the schedule)
max_steps = 2400           # tiny, one run of the paper's losses (the shipped recipe's stages: assets/make_tiny.sh)
lr = 0.0                   # 0: the model config's lr / lr_unet / lr_offsets; else one lr scales all three alike
weight_decay = 0.01
beta1, beta2, eps = 0.9, 0.99, 1e-8
warmup_steps = 50
schedule = "cosine"        # "cosine" (to min_lr_ratio * lr at max_steps) or "constant" after warmup
min_lr_ratio = 0.1
grad_clip = 1.0            # 0 disables
# system
device = "cpu"             # "cpu", "cuda", "cuda:1", ...
dtype = "float32"          # "float32", "bfloat16" or "float16" (autocast; fp16 uses a GradScaler)
compile = False
grad_checkpointing = False
quantize = ""              # "int8": the frozen LLM's Linear layers in int8 (quant.py; needs freeze_llm, as official)
threads = 1                # torch CPU threads per process, 0 = torch's default (tiny: 1; use processes)
# official components (preset "official"): folders for checkpoints.build_model. Other presets: sd_path, a tiny Stable
# Diffusion folder of tiny_sd.py, is built on as the paper builds on SD 2.1: its U-Net frozen (--freeze_unet=False
# fine-tunes it), the null condition from its encoding of ""; --sd_path="" trains everything from scratch
clip_path = llm_path = ""
# tiny-only warm start of the decoder's context (distill.py): steps regressing the condition for "<s> caption BoI"
# onto the sd_path text encoder's encoding of the caption, no U-Net pass, before the joint stage (0: none)
warm_steps = 0
warm_batch = 32
warm_lr = 1e-3
# tiny-only: the same distillation on every image with context in the training rows (a story's next picture: the
# caption of the edited scene), added to the loss with this weight (0: off); --diffusion=False skips the U-Net
distill_weight = 0.0
diffusion = True
sd_path = str(Path(__file__).resolve().parent / "assets" / "tiny-sd")
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 0          # 0: evaluate once at the end
eval_n = 50                # held-out examples per kind
eval_seed = 0              # which held-out examples, and the sampling noise
eval_only = False          # True: score --init_from (a model folder) and print one JSON line, no training
init_from = ""             # a model folder (checkpoints.save) to start from instead of building the preset
eval_kinds = "i2t,qa,t2i,story"
eval_steps = SAMPLING["steps"]        # diffusion sampling in eval: the demo's settings (generate.SAMPLING);
eval_sampler = SAMPLING["sampler"]    # text is greedy
eval_guidance = SAMPLING["guidance"]
ckpt_interval = 200        # also at the end
PRESET_KNOBS = {  # docs/official.md: AdamW (0.9, 0.995), eps 1e-6, wd 0.05, warmup 1000, 15k steps cosine to 0, context 2048
    "official": dict(sd_path="", beta2=0.995, eps=1e-6, weight_decay=0.05, warmup_steps=1000, max_steps=15000, seq_len=2048,
                     schedule="cosine", min_lr_ratio=0.0, out_dir="out-official", eval_guidance=3.5, eval_steps=50,
                     eval_n=20),
}
RANGES = {  # every numeric knob's valid values (cli.check_ranges), checked before any work
    "seed": ">= 0", "seq_len": ">= 1", "batch_size": ">= 1", "grad_accum": ">= 1", "num_workers": ">= 0",
    "max_steps": ">= 0", "lr": ">= 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "> 0",
    "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "grad_clip": ">= 0", "threads": ">= 0", "log_interval": ">= 1",
    "eval_interval": ">= 0", "eval_n": ">= 0", "eval_seed": ">= 0", "eval_steps": ">= 1", "eval_guidance": ">= 0",
    "ckpt_interval": ">= 0", "warm_steps": ">= 0", "warm_batch": ">= 1", "warm_lr": "> 0", "distill_weight": ">= 0",
    "story_min_shapes": f"[1, {world.MAX_SHAPES}]",
}
# -----------------------------------------------------------------------------

knob_names = [k for k, v in globals().items() if not k.startswith("_") and k != "PRESET_KNOBS"
              and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in knob_names}


def main(argv):
    """One run: train.py's command line as a list ("--key=value", ...). The knobs are this module's globals, as in
    nanoGPT; each call starts from their defaults (so tests can call main in-process)."""
    global device  # a knob that DDP sets per process
    globals().update(DEFAULTS)
    model_overrides = {}  # keys that are not knobs: model-config fields
    _updates = cli.parse_flags([a.replace("--data=", "--data_paths=", 1) for a in argv],
                               {k: globals()[k] for k in knob_names}, extra=model_overrides)
    globals().update(PRESET_KNOBS.get(_updates.get("preset", preset), {}))
    globals().update(_updates)
    cli.check_ranges({k: globals()[k] for k in knob_names}, RANGES)
    if eval_only and not (eval_n and eval_kinds.strip(",")):
        raise SystemExit("error: --eval_only=True scores held-out examples: it needs --eval_n >= 1 and --eval_kinds")
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in DTYPES:
        raise SystemExit(f"error: --dtype={dtype} is not one of {', '.join(DTYPES)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SystemExit(f"error: --device={device} is not one of cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but torch {torch.__version__} sees no CUDA device; "
                         "use --device=cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device={device} but there are {torch.cuda.device_count()} CUDA devices "
                         "(cuda:0 ...)")
    CHOICES = {"schedule": ("cosine", "constant"), "eval_sampler": ("ddim", "ddpm"), "quantize": ("", "int8")}
    for _k, _options in CHOICES.items():
        if globals()[_k] not in _options:
            raise SystemExit(f"error: --{_k}={globals()[_k]} is not one of {', '.join(_options)}")
    if not set(filter(None, eval_kinds.split(","))) <= set(world.KINDS):
        raise SystemExit(f"error: --eval_kinds={eval_kinds}: each must be one of {', '.join(world.KINDS)}")
    try:  # the synthetic document mixture
        mix = {k: float(w) for k, w in (kw.split(":") for kw in kinds.split(","))}
        assert mix and set(mix) <= set(world.KINDS) and all(w >= 0 for w in mix.values()) and sum(mix.values()) > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --kinds expects kind:weight pairs of {', '.join(world.KINDS)} with weights >= 0, "
                         f"e.g. 't2i:0.3,i2t:0.3,qa:0.2,story:0.2'; got {kinds!r}")
    data_files = [p for p in data_paths.split(",") if p]
    missing = [p for p in data_files if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: --data_paths: no such file: {', '.join(missing)} "
                         "(expects comma-separated .jsonl files)")
    for _k in [k for k in ("kinds", "story_min_shapes") if k in _updates] if data_files else []:
        raise SystemExit(f"error: --{_k} shapes the synthetic world's documents; --data_paths reads corpora instead")
    config = {k: globals()[k] for k in knob_names}  # what the checkpoint and the log record
    if int(os.environ.get("RANK", 0)) == 0:
        for k, v in {**_updates, **model_overrides}.items():
            print(f"override: {k} = {v!r}")

    # -----------------------------------------------------------------------------
    # distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world_size = 0, 1
    master = rank == 0
    if threads:
        torch.set_num_threads(threads)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype = DTYPES[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    out = cli.writable_dir(out_dir, "out_dir") if master else Path(out_dir)
    ckpt_file = out / "ckpt.pt"

    # -----------------------------------------------------------------------------
    # model, optimizer, schedule
    torch.manual_seed(seed)
    ckpt = None
    if resume:
        if not ckpt_file.exists():
            raise SystemExit(f"error: --resume=True but there is no checkpoint at {ckpt_file}")
        try:  # plain tensors and Python containers only (weights_only=True): never unpickle arbitrary objects
            ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: cannot read checkpoint {ckpt_file}: {str(e).splitlines()[0]}")
        if model_overrides and model_overrides != ckpt["model_overrides"]:
            raise SystemExit(f"error: model-config flags {model_overrides} differ from the checkpoint's "
                             f"{ckpt['model_overrides']} ({ckpt_file}); --resume keeps the checkpoint's model")
        model_overrides = ckpt["model_overrides"]  # the architecture comes from the checkpoint
    try:
        if init_from:  # a model folder (checkpoints.save / out_dir) to evaluate or to train further
            model = checkpoints.build_model(ckpt=init_from)
        elif preset == "official":
            if not (clip_path and llm_path and sd_path):
                raise SystemExit("error: preset 'official' needs --clip_path, --llm_path and --sd_path")
            model = checkpoints.build_model(preset, clip=clip_path, llm=llm_path, sd=sd_path, dtype=ptdtype,
                                            **model_overrides)
        elif sd_path:  # the tiny world on its tiny SD: U-Net frozen, null condition from the encoding of ""
            null = TextEncoder.from_pretrained(sd_path).encode([""])[0]
            model = checkpoints.build_model(preset, sd=sd_path, null_cond=null,
                                            **{"freeze_unet": True, **model_overrides})
        else:
            model = checkpoints.build_model(preset, **model_overrides)
    except (KeyError, TypeError) as e:
        raise SystemExit(f"error: bad model-config override: {e}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        flag = "--init_from" if init_from else "--sd_path" if sd_path else "--preset"
        raise SystemExit(f"error: {flag}: {str(e).splitlines()[0]}")
    for k, v in model_overrides.items() if init_from else ():  # the folder's model: a flag may agree, not change it
        have = functools.reduce(lambda d, f: d.get(f) if isinstance(d, dict) else None, k.split("."), asdict(model.cfg))
        if have != v:
            raise SystemExit(f"error: --{k}={v!r}: the model of --init_from={init_from} has {have!r} "
                             "(its config.json); model-config flags build a new model, they do not change one")
    if quantize:  # the frozen LLM's Linear layers (the default filter: those that need no gradient)
        if not (model.cfg.components and model.cfg.freeze_llm):  # else saving would store the int8 weights
            raise SystemExit("error: --quantize=int8 is for a frozen LLM loaded from --llm_path (the official preset)")
        quantize_int8(model.llm)
    skip_keys = checkpoints.official_keys(model)  # frozen official weights are not stored in checkpoints
    if ckpt is not None:
        state = ckpt["model"]
        missing = set(model.state_dict()) - skip_keys - state.keys()
        if missing or state.keys() - set(model.state_dict()):
            raise SystemExit(f"error: {ckpt_file} does not match the model (missing {sorted(missing)[:5]})")
        model.load_state_dict(state, strict=False)
    model.to(device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    tok = model.tok
    mcfg = model.cfg
    # what a row and a document may hold against what the model can: its context and the images a token looks back at
    if seq_len > model.llm.cfg.max_seq_len:
        raise SystemExit(f"error: --seq_len={seq_len}: the model's context holds {model.llm.cfg.max_seq_len} positions")
    if seq_len < mcfg.n_image_tokens + 3:
        raise SystemExit(f"error: --seq_len={seq_len}: a row must hold <s>, one image ({mcfg.n_image_tokens + 1} "
                         f"positions) and a token: at least {mcfg.n_image_tokens + 3}")
    doc_images = data.MAX_IMAGES if data_files else world.MAX_DOC_IMAGES
    if doc_images > mcfg.max_images:
        raise SystemExit(f"error: documents may hold {doc_images} images; the model sees at most max_images="
                         f"{mcfg.max_images} (--max_images=...)")
    text_encoder = None  # the distillation target (distill.py)
    if (warm_steps or distill_weight) and not eval_only:
        for flag in ("warm_steps", "distill_weight"):
            if globals()[flag] and (not sd_path or preset == "official" or data_paths):
                raise SystemExit(f"error: --{flag} needs the tiny world's --sd_path and documents (its text "
                                 "encoder is the target)")
        text_encoder = TextEncoder.from_pretrained(sd_path).to(device)
    warm_records = []  # the warm start's progress: printed, and written to log.jsonl once it is open
    if warm_steps and ckpt is None and not eval_only:  # every rank the same steps: the same weights
        t, rank0 = time.time(), int(os.environ.get("RANK", 0)) == 0
        mse = distill.warm_start(model, text_encoder, warm_steps, warm_batch, warm_lr, seed,
                                 log=(lambda r: (print(r), warm_records.append(r))) if rank0 else None)
        warm_records.append(dict(warm_steps=warm_steps, condition_mse=mse, warm_time=time.time() - t))
        if rank0:
            print(f"warm start: {warm_steps} steps, condition MSE {mse:.4f}, {time.time() - t:.0f} s")

    # lr=0 keeps the model's per-group learning rates; else lr sets the main one and the others keep their ratio
    scale = lr / mcfg.lr if lr else 1.0
    groups = model.param_groups(weight_decay, mcfg.lr * scale, mcfg.lr_unet * scale, mcfg.lr_offsets * scale)
    # fused: one kernel for every parameter, on CPU too (11 ms instead of 43 for the tiny model: bench/README.md)
    optimizer = torch.optim.AdamW(groups, betas=(beta1, beta2), eps=eps, fused=device_type in ("cpu", "cuda"))


    def lr_factor(step):  # linear warmup, then cosine down to min_lr_ratio (or constant)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy_key"].numpy().astype(np.uint32), *rng["numpy_rest"]))
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))

    raw_model = model  # what gets saved: never the compiled or DDP wrapper (no "_orig_mod." / "module." keys)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    if compile:
        model = torch.compile(model)
    if ddp:
        # FSDP would plug in here instead (torch.distributed.fsdp.fully_shard on each LLM block and the U-Net) when
        # the trainable weights plus AdamW state do not fit one GPU; everything else in this file stays the same.
        # a batch without images (or whose images have no context) leaves some parameters unused: DDP finds them
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, find_unused_parameters=True)
        # the 1x1 and depthwise conv weights' gradients come with other strides on their size-1 dims (the same
        # memory order): DDP copies them instead of using a view, at no cost worth a warning
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if master:
        counts = raw_model.param_counts()
        n_all, n_train = sum(a for a, _ in counts.values()), sum(b for _, b in counts.values())
        print(f"model: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
              f"global batch {batch_size * grad_accum * world_size} rows of {seq_len} tokens; world {world_size}")

    # -----------------------------------------------------------------------------
    # data: the synthetic world is a pure function of the micro-batch index; corpora are read in order (resume skips
    # the micro-batches already seen in the current epoch). Bad data is counted per epoch and for the run (data.Stats).

    def gather(obj):  # every rank's obj, in rank order (a collective: every rank calls it)
        if not ddp:
            return [obj]
        objs = [None] * world_size
        dist.all_gather_object(objs, obj)
        return objs


    def all_ranks(stats):  # one Stats with every rank's counts (the records it lists are this rank's)
        out = data.Stats()
        out.skipped = stats.skipped
        for state in gather(stats.state()):
            out.merge(state)
        return out


    stats = data.Stats()
    if ckpt is not None and master and "skipped" in ckpt:
        stats.merge(ckpt["skipped"])  # the counts of all ranks up to the checkpoint
    if data_paths:
        corpus = data.CorpusDataset(data_files, tok, mcfg.n_image_tokens, seq_len, image_size=mcfg.image_size,
                                    seed=seed, rank=rank, world_size=world_size)
    else:
        synth = data.SyntheticDataset(tok, mcfg.n_image_tokens, seq_len, seed=seed, image_size=mcfg.image_size,
                                      kinds=mix, story_min_shapes=story_min_shapes)
    data_pos = dict(ckpt["data_pos"]) if ckpt is not None else dict(epoch=0, micro=0)


    def corpus_batches():
        """Endless micro-batches from the corpora, epoch after epoch; reports bad data at the end of each epoch, and
        stops at the end of the first epoch that had no batch at all. Under DDP an epoch ends for all ranks as soon as
        one rank runs out of rows."""
        while True:
            corpus.set_epoch(data_pos["epoch"])
            loader = torch.utils.data.DataLoader(corpus, batch_size=batch_size, collate_fn=data.collate,
                                                 num_workers=num_workers)
            it = iter(loader)

            def next_batch(count=True):  # the next batch with tokens, or None at the end of this rank's rows
                for b in it:
                    skipped = b.pop("skipped")
                    if count:
                        stats.add(skipped)
                    if "tokens" in b:  # else a shard with nothing usable sent its skipped records alone
                        return b
                return None

            for _ in range(data_pos["micro"]):  # skip what this epoch already trained on (counted in the checkpoint)
                next_batch(count=False)
            while True:
                b = next_batch()
                more = torch.tensor(float(b is not None))
                if ddp:
                    dist.all_reduce(more, op=dist.ReduceOp.MIN)
                if not more:
                    break
                data_pos["micro"] += 1
                yield b
            counts = all_ranks(stats)
            if data_pos["micro"] == 0:  # nothing to train on: stop, rather than start the next epoch forever
                why = f"skipped {counts.summary(counts.epoch)}, kept none" if counts.epoch else "no document in them"
                if world_size > 1:
                    why += f" (for one of the {world_size} ranks: rank r reads lines r, r + {world_size}, ...)"
                raise SystemExit(f"error: --data_paths: nothing usable in {', '.join(data_files)}: {why}"
                                 if master else 1)
            if master:
                tqdm.write(f"epoch {data_pos['epoch']} done: {counts.report()}")
                log(dict(epoch=data_pos["epoch"], skipped=sum(counts.epoch.values()),
                         skipped_in_all=sum(counts.total.values()), skipped_kinds=dict(counts.epoch)))
            stats.end_epoch()
            data_pos["epoch"], data_pos["micro"] = data_pos["epoch"] + 1, 0


    def synthetic_batches():
        for b in synth.loader(batch_size, start_step * grad_accum, rank, world_size, num_workers):
            stats.add(b.pop("skipped"))  # documents longer than seq_len
            yield b


    batches = corpus_batches() if data_paths else synthetic_batches()


    def to_device(b):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


    # -----------------------------------------------------------------------------
    # evaluation on the held-out synthetic split, scored by world.score

    @torch.no_grad()
    def evaluate(m, n=eval_n, kinds=eval_kinds):
        """Held-out scores (a collective: every rank calls it). Rank r scores examples r, r + world_size, ...; each
        example draws from its own noise (world.eval_examples' noise_seed), so the scores do not depend on the number
        of processes or on the other kinds evaluated."""
        m.eval()
        opts = dict(temperature=0.0, steps=eval_steps, sampler=eval_sampler, guidance=eval_guidance)
        kind_list = [k for k in kinds.split(",") if k]
        mine = {}  # (kind, index) -> score, for this rank's examples
        for kind in kind_list:
            for i, ex in enumerate(world.eval_examples(kind, n, seed=eval_seed, size=mcfg.image_size)):
                if i % world_size != rank:
                    continue
                gen = torch.Generator(device).manual_seed(ex["noise_seed"])
                if kind in ("i2t", "qa"):  # text answer; greedy
                    items = generate(m, ex["prompt"], max_new_tokens=160 if kind == "i2t" else 20, max_images=0,
                                     generator=gen, **opts)
                    pred = next((x for x in items if isinstance(x, str)), "")
                else:  # the prompt ends where an image must come: start it at once
                    pred = draw_image(m, ex["prompt"], generator=gen, **opts)
                mine[kind, i] = world.score(ex, pred)
        scores = {k: v for part in gather(mine) for k, v in part.items()}
        metrics = {}
        for kind in kind_list:
            of_kind = [scores[kind, i] for i in range(n)]
            for key in of_kind[0]:
                metrics[f"{kind}_{key}"] = sum(s[key] for s in of_kind) / n
        m.train()
        return metrics


    # -----------------------------------------------------------------------------
    # checkpoints: ckpt.pt (all that resuming needs) and the model for sample.py (model.safetensors + config.json) are
    # all written into out/.saving, then renamed into place, ckpt.pt last: a crash never leaves a broken file, and the
    # three come from the same step (a Ctrl-C waits for the save to end: ctrl_c_deferred below)

    def save_checkpoint(step):
        _, key, *rest = np.random.get_state()  # stored as tensors and numbers so that weights_only loading works
        rng = dict(torch=torch.get_rng_state(), numpy_key=torch.from_numpy(key.astype(np.int64)), numpy_rest=list(rest),
                   python=list(random.getstate()))
        rngs, skipped = gather(rng), all_ranks(stats).state()
        if not master:
            return
        state = {k: v for k, v in raw_model.state_dict().items() if k not in skip_keys}
        obj = dict(model=state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   scaler=scaler.state_dict(), step=step, rng=rngs, data_pos=dict(data_pos), skipped=skipped,
                   config=config, model_overrides=model_overrides, model_config=asdict(mcfg))
        tmp = out / ".saving"
        checkpoints.save(raw_model, tmp)
        torch.save(obj, tmp / "ckpt.pt")
        for name in ("model.safetensors", "config.json", "ckpt.pt"):
            os.replace(tmp / name, out / name)
        tmp.rmdir()


    # -----------------------------------------------------------------------------
    # training loop
    log_file = open(out / "log.jsonl", "a") if master else None


    def log(record):
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()


    for record in warm_records:
        log(record)


    def stop(why, status):
        """End the run with one line: why, and where the last good checkpoint is."""
        msg = f"{why}; stopping. " + (f"The last good checkpoint is {ckpt_file} (step {last_good})."
                                      if last_good is not None else "No checkpoint was written yet.")
        if master:
            log(dict(step=step, error=msg))
            pbar.close()
            print(msg, file=sys.stderr)
        sys.exit(status)


    @contextmanager
    def ctrl_c_deferred():
        """A Ctrl-C during the block takes effect when the block ends: a checkpoint is never left half written."""
        got = []
        handler = signal.signal(signal.SIGINT, lambda *_: got.append(True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, handler)
        if got:
            handler(signal.SIGINT, None)


    if eval_only:  # score the model (--init_from) on the held-out scenes and print one JSON line
        metrics = evaluate(raw_model)
        if master:
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        if ddp:
            dist.destroy_process_group()
        sys.exit(0)
    last_good = start_step if ckpt is not None else None
    model.train()
    if start_step < max_steps:  # the first micro-batch before the progress bar: a corpus with nothing usable stops here
        try:
            batches = itertools.chain([next(batches)], batches)
        except ValueError as e:  # e.g. a seq_len too short for any synthetic document
            raise SystemExit(f"error: --seq_len={seq_len}: {e}")
    pbar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not master,
                dynamic_ncols=True)
    step = start_step
    signal.signal(signal.SIGINT, lambda *_: stop("interrupted (Ctrl-C)", 130))  # one line, no traceback
    t0, tokens_seen, images_seen = time.time(), 0, 0
    for step in pbar:
        sums = torch.zeros(6, dtype=torch.float64)  # loss, text, image, distill losses, tokens, images (this rank)
        for micro in range(grad_accum):
            batch = to_device(next(batches))
            g = (step * grad_accum + micro) * world_size + rank
            torch.manual_seed(seed * 1_000_003 + g)  # the micro-batch's own randomness, whichever process runs it
            sync = micro == grad_accum - 1
            with (nullcontext() if sync or not ddp else model.no_sync()), autocast:
                out_ = model(batch, draw=diffusion)
                distill_v = (distill.drawn_loss(out_, batch.get("images"), text_encoder) if distill_weight
                             else torch.zeros((), device=device))
                total = out_["loss"] + distill_weight * distill_v
                loss = total / grad_accum
            scaler.scale(loss).backward()
            sums += torch.tensor([total.item(), out_["text_loss"].item(), out_["image_loss"].item(), distill_v.item(),
                                  int((batch["tokens"] != tok.pad_id).sum()), out_["n_images"]], dtype=torch.float64)
        for p in trainable:  # a parameter this step did not use: a zero gradient, so AdamW still decays it
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if ddp:
            dist.all_reduce(sums)
        n_micro = grad_accum * world_size
        loss_v, text_v, image_v, distill_v = (sums[:4] / n_micro).tolist()
        if not math.isfinite(loss_v):
            if ddp:
                dist.destroy_process_group()
            stop(f"step {step}: loss is {loss_v}", 2)
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        tokens_seen, images_seen = tokens_seen + int(sums[4]), images_seen + int(sums[5])
        dt = time.time() - t0
        pbar.set_postfix_str(f"loss {loss_v:.3f} text {text_v:.3f} img {image_v:.4f} distill {distill_v:.4f} "
                             f"{tokens_seen / dt:.0f} tok/s")
        if (step + 1) % log_interval == 0 or step + 1 == max_steps or step == start_step:
            log(dict(step=step + 1, loss=loss_v, text_loss=text_v, image_loss=image_v, distill_loss=distill_v,
                     lr=lr_now, tokens_per_s=tokens_seen / dt, images_per_s=images_seen / dt, time=dt))
        done = step + 1 == max_steps
        if (ckpt_interval and (step + 1) % ckpt_interval == 0) or done:
            with ctrl_c_deferred():
                save_checkpoint(step + 1)
                last_good = step + 1
        if eval_n and ((eval_interval and (step + 1) % eval_interval == 0) or done):
            te = time.time()
            metrics = evaluate(raw_model)  # every rank scores its share
            t0 += time.time() - te  # throughput counts training time only
            if master:
                log(dict(step=step + 1, eval=metrics, eval_time=time.time() - te))
                tqdm.write(f"step {step + 1} eval: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    pbar.close()
    counts = all_ranks(stats)
    if master:
        log(dict(step=max_steps, skipped_in_all=sum(counts.total.values()), skipped_kinds=dict(counts.total)))
        print(f"done: {max_steps} steps, {time.time() - t0:.0f} s of training; data: skipped "
              f"{counts.summary(counts.total)} in all")
        print(f"checkpoint: {ckpt_file}; model for sample.py: {out}/model.safetensors")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
