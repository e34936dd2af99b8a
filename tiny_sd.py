"""
A tiny Stable Diffusion for the synthetic world: the tiny preset's pixel-space U-Net trained as a text-to-image model
on the world's (caption, image) pairs, reading a frozen stand-in for SD's CLIP text encoder, and saved in the
diffusers layout. The MMI stage builds on it as the paper builds on SD 2.1: it takes the U-Net from this folder and
starts its null condition from the empty caption's encoding, `TextEncoder.empty(n)`.

    assets/tiny-sd/unet/             config.json + diffusion_pytorch_model.safetensors (unet.UNet.from_pretrained)
    assets/tiny-sd/scheduler/        scheduler_config.json (diffusion.NoiseSchedule.from_pretrained)
    assets/tiny-sd/text_encoder/     config.json (vocabulary) + model.safetensors (TextEncoder.from_pretrained)
    assets/tiny-sd/log.jsonl         the run that made it: settings, loss, held-out scores

The shipped folder is exactly this run (seed 0, one thread; 1200 steps of 10 images, 7.2 CPU-min of training):

    OMP_NUM_THREADS=1 python tiny_sd.py        # = --steps=1200 --batch=10 --seed=0 --out_dir=assets/tiny-sd

Any keyword of `train` is a flag (`--steps=2 --out_dir=out-tiny-sd`); the U-Net config and the schedule are
mmi.PRESETS["tiny"]'s (clip_sample off: see train). Held-out text-to-image is scored with world.eval_examples("t2i")
/ world.score, DDIM 25 steps, classifier-free guidance 1 (none) and 2 (the empty caption as the unconditional input).
The shipped run, per cell / occupied cells at guidance 1 (40 scenes; 100 at the end; guidance 2 within 2 points
from step 600 on):
step 400 59% / 4%, 600 81% / 42%, 800 99% / 96%, 1000 and 1200 100% / 100% (100% of scenes exact).

    te, net = TextEncoder.from_pretrained("assets/tiny-sd"), unet.UNet.from_pretrained("assets/tiny-sd")
    sched = diffusion.NoiseSchedule.from_pretrained("assets/tiny-sd")
    images = sample(net, sched, te.encode(["a red circle in the top left."]), te.encode([""]), guidance=2.0)
    # -> [1, 3, 32, 32] in [0, 1]
"""
import copy
import inspect
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cli
import world
from diffusion import NoiseSchedule, guided
from mmi import PRESETS
from unet import UNet, UNetConfig
from vit import to_tensor01
from weights import component_folder, load_strict, open_checkpoint, read_json, weight_files, write_atomically

PAD, UNK = "<pad>", "<unk>"
# the content words of the world's captions (other words read as <unk>); the function words, the same in every
# object phrase, would only add one constant to every token and are skipped
WORDS = (*world.COLOURS, *world.SHAPES, *dict.fromkeys(w for c in world.CELLS for w in c.split()))
STOP = ("a", "an", "in", "the")


# -----------------------------------------------------------------------------------------------------------------
# the stand-in text encoder


class TextEncoder(nn.Module):
    """The tiny stand-in for SD's CLIP text encoder, frozen. A caption's text (never its scene) is split into object
    phrases ("a red circle in the top left"); each phrase is one token, the sum of fixed random embeddings of its
    words (a bag of words: in this world no two objects' phrases share a bag, since colours, shapes and the cells'
    word sets are all distinct), padded with the <pad> embedding to n_tokens and normalised by a final LayerNorm as
    CLIP's last layer does (so every dimension is ~1 in scale). No position embedding: the object order of a caption
    carries nothing, and the U-Net's cross-attention does not see the order of its context either. The empty caption
    is all <pad>: SD's unconditional input."""

    def __init__(self, vocab=(PAD, UNK, *WORDS), dim=64, n_tokens=16, stop=STOP, seed=0):
        super().__init__()
        self.vocab, self.n_tokens, self.stop = list(vocab), n_tokens, list(stop)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():  # seeded, so a rebuilt encoder is the same; from_pretrained reads the saved table anyway
            self.embed.weight.copy_(torch.randn(len(self.vocab), dim, generator=torch.Generator().manual_seed(seed)))
        self.requires_grad_(False)

    @property
    def config(self):
        return dict(vocab=self.vocab, stop=self.stop, dim=self.embed.embedding_dim, n_tokens=self.n_tokens)

    def phrases(self, text):
        """'a red circle in the top left and a blue square in the centre.' -> [[ids of phrase 1], [ids of phrase 2]]
        (the separators of world.caption; at most n_tokens phrases, the rest cut off as CLIP cuts at 77 tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"TextEncoder reads caption strings, got {type(text).__name__}")
        parts = [[w for w in p.split() if w not in self.stop] for p in re.split(r",|\band\b|\.", text.lower())]
        return [[self.index.get(w, self.index[UNK]) for w in p] for p in parts if p][:self.n_tokens]

    @torch.no_grad()
    def encode(self, captions):
        """list of caption strings -> [B, n_tokens, dim]: the U-Net's context."""
        if isinstance(captions, str):
            captions = [captions]
        w = self.embed.weight
        out = w[self.index[PAD]].repeat(len(captions), self.n_tokens, 1)
        for b, text in enumerate(captions):
            for j, ids in enumerate(self.phrases(text)):
                out[b, j] = w[ids].sum(0)
        return self.norm(out)

    forward = encode

    def empty(self, n=None):
        """The empty caption's encoding [n, dim] (n defaults to n_tokens): SD's unconditional input, where MMI's null
        condition starts. Its tokens are all <pad>, so any n gives the U-Net's cross-attention the same input."""
        return self.encode([""])[0, :1].expand(n or self.n_tokens, -1).clone()

    def save_pretrained(self, path):
        """path/config.json (vocabulary, width, tokens) + path/model.safetensors (embedding table, LayerNorm)."""
        from safetensors.torch import save_file
        path = Path(path)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        write_atomically(path / "model.safetensors", lambda f: save_file(tensors, f))
        _write_json(path / "config.json", dict(_class_name="TextEncoder", **self.config))

    @classmethod
    def from_pretrained(cls, path):
        """A text_encoder/ folder or a tiny-SD root."""
        path = component_folder(Path(path), "text_encoder")
        d = read_json(path / "config.json")
        with torch.device("meta"):
            model = cls(d["vocab"], d["dim"], d["n_tokens"], d["stop"])
        return load_strict(model, open_checkpoint(weight_files(path, "model")), str(path)).eval()


# -----------------------------------------------------------------------------------------------------------------
# saving (diffusers layout), sampling, evaluation


def _write_json(path, d):
    write_atomically(path, lambda f: Path(f).write_text(json.dumps(d, indent=1) + "\n"))


def save(path, net, schedule, text_encoder):
    """The diffusers layout: unet/, scheduler/, text_encoder/ and a model_index.json naming them."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_atomically(path / "unet" / "diffusion_pytorch_model.safetensors", lambda f: save_file(tensors, f))
    _write_json(path / "unet" / "config.json", dict(_class_name="UNet2DConditionModel", **asdict(net.cfg)))
    _write_json(path / "scheduler" / "scheduler_config.json", dict(_class_name="DDIMScheduler", **schedule.config))
    text_encoder.save_pretrained(path / "text_encoder")
    _write_json(path / "model_index.json", dict(_class_name="TinyStableDiffusion", unet=["unet", "UNet"],
                                                scheduler=["diffusion", "NoiseSchedule"],
                                                text_encoder=["tiny_sd", "TextEncoder"]))


@torch.no_grad()
def sample(net, schedule, context, null=None, noise=None, steps=25, guidance=1.0, generator=None):
    """context [B, T, C] (TextEncoder.encode) -> images [B, 3, H, W] in [0, 1] (pixel space, no VAE). guidance != 1
    needs null, the empty caption's encoding ([1 or B, T, C]), as the unconditional input."""
    B, size = context.shape[0], net.cfg.sample_size
    if noise is None:
        noise = torch.randn(B, net.cfg.in_channels, size, size, generator=generator)
    if guidance == 1.0:
        fn = lambda x, t: net(x, t, context)  # noqa: E731
    else:
        both = torch.cat([context, null.expand(B, -1, -1)])
        fn = guided(lambda x, t: net(x, t, both), guidance)
    x = schedule.sample(fn, noise, steps=steps, sampler="ddim", generator=generator)
    return ((x + 1) / 2).clamp(0, 1)


def evaluate(net, schedule, text_encoder, n=50, seed=0, steps=25, guidances=(1.0, 2.0)):
    """Held-out text-to-image: {"g1": {"cell_acc", "object_acc", "exact"}, "g2": ...}, means over n scenes of
    world.eval_examples("t2i", n, seed); the same starting noise for every guidance scale."""
    was = net.training
    net.eval()
    examples = world.eval_examples("t2i", n, seed)
    context = text_encoder.encode([ex["prompt"][0] for ex in examples])
    null = text_encoder.encode([""])
    noise = torch.randn(n, net.cfg.in_channels, net.cfg.sample_size, net.cfg.sample_size,
                        generator=torch.Generator().manual_seed(seed))
    out = {}
    for g in guidances:
        images = sample(net, schedule, context, null, noise, steps, g)
        scores = [world.score(ex, img) for ex, img in zip(examples, images)]
        out[f"g{g:g}"] = {k: round(sum(s[k] for s in scores) / n, 4) for k in ("cell_acc", "object_acc", "exact")}
    net.train(was)
    return out


# -----------------------------------------------------------------------------------------------------------------
# training


def train(out_dir="assets/tiny-sd", steps=1200, batch=10, lr=2e-3, warmup=30, weight_decay=0.01, p_uncond=0.1,
          ema=0.99, seed=0, eval_every=200, eval_n=40, eval_seed=0, eval_steps=25, final_eval_n=100, unet=None,
          n_tokens=16):
    """Train the tiny SD and save it to out_dir (after every evaluation and at the end). unet: overrides of the
    tiny preset's U-Net config (tests use a micro one). Returns the final held-out scores."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = UNetConfig.from_dict({**PRESETS["tiny"]["unet"], **(unet or {})})
    # clip_sample off, as SD 2.1's scheduler: in pixel space the black background sits at -1, the edge of the clip
    # range; guidance pushes it beyond, and clipping x0 while DDIM keeps the unclipped eps (diffusers' default)
    # brightens it into shapes nobody asked for (held-out cells 62% at guidance 2 with clipping, 100% without)
    net, schedule = UNet(cfg), NoiseSchedule(**{**PRESETS["tiny"]["schedule"], "clip_sample": False})
    te = TextEncoder(dim=cfg.cross_attention_dim, n_tokens=n_tokens, seed=seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    # the shipped weights are an exponential moving average of the trained ones, as SD's (its "-ema" checkpoints)
    avg = copy.deepcopy(net).requires_grad_(False)
    out = Path(out_dir)
    settings = {k: v for k, v in locals().items() if k in inspect.signature(train).parameters}
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")

    def log(record):
        print(json.dumps(record), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    log(dict(settings=settings, unet_params=sum(p.numel() for p in net.parameters()), threads=torch.get_num_threads()))
    train_s, cpu_s, smooth = 0.0, 0.0, None  # wall and CPU seconds of training alone (the machine may be shared)
    for step in range(1, steps + 1):
        t0, c0 = time.time(), time.process_time()
        for g in opt.param_groups:  # linear warmup, cosine to 10%
            g["lr"] = lr * min(step / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        scenes = [world.random_scene(rng) for _ in range(batch)]
        x0 = torch.stack([to_tensor01(world.render(s, cfg.sample_size)) for s in scenes]) * 2 - 1
        # the caption dropped for p_uncond of the images, as SD was trained: the unconditional mode guidance needs
        context = te.encode(["" if rng.random() < p_uncond else world.caption(s) for s in scenes])
        noise = torch.randn_like(x0)
        t = torch.randint(0, schedule.N, (batch,))
        loss = F.mse_loss(net(schedule.add_noise(x0, noise, t), t, context), schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # the average starts fast (decay (1 + step) / (10 + step) until it reaches ema)
            torch._foreach_lerp_(list(avg.parameters()), list(net.parameters()), 1 - min(ema, (1 + step) / (10 + step)))
        train_s, cpu_s = train_s + time.time() - t0, cpu_s + time.process_time() - c0
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        last = step == steps
        if (eval_every and step % eval_every == 0) or last:
            n = final_eval_n if last else eval_n
            t0 = time.time()
            scores = evaluate(avg, schedule, te, n, eval_seed, eval_steps)
            log(dict(step=step, loss=round(smooth, 5), train_s=round(train_s, 1), cpu_s=round(cpu_s, 1), eval_n=n,
                     eval_s=round(time.time() - t0, 1), **scores))
            save(out, avg, schedule, te)
    return scores


RANGES = {"steps": ">= 1", "batch": ">= 1", "lr": "> 0", "warmup": ">= 1", "weight_decay": ">= 0", "p_uncond": "[0, 1]",
          "ema": "[0, 1)", "seed": ">= 0", "eval_every": ">= 0", "eval_n": ">= 1", "eval_seed": ">= 0",
          "eval_steps": ">= 1", "final_eval_n": ">= 1", "n_tokens": ">= 1"}  # train()'s numeric arguments


def main(argv):
    """--key=value for any keyword of train (typed by its default; --unet takes a dict literal), each checked against
    its range and the output folder proved writable before training starts."""
    defaults = {k: v.default for k, v in inspect.signature(train).parameters.items()}
    kw = cli.parse_flags(argv, defaults)
    cli.check_ranges({**defaults, **kw}, RANGES)
    cli.writable_dir(kw.get("out_dir", defaults["out_dir"]), "out_dir")
    torch.set_num_threads(1)
    train(**kw)


if __name__ == "__main__":
    main(sys.argv[1:])
