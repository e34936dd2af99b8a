"""
Where text-to-image gets stuck in the tiny model: the tiny U-Net trained on the synthetic world (t2i only, no ViT)
under different condition paths, then scored per cell on held-out scenes (DDIM 25 steps, no guidance).

  cells     oracle: one token per grid cell = cell + colour + shape embeddings (an empty cell: cell + "none")
  objects   oracle: one token per object = cell + colour + shape embeddings, zero tokens up to 4
  objects_mlp  the object tokens -> a per-token MLP (LayerNorm, Linear, GELU, Linear): learned, but no pooling
  objects_resampler  the object tokens -> the model's decoder resampler (mask on the zero tokens)
  words     the caption's token embeddings + 1D sin-cos, straight into the U-Net (nothing binds words to objects)
  resampler the same embeddings -> the model's context projection + sin-cos -> decoder resampler
  llm       the model's path minus the ViT: a fresh tiny LLM (LM loss + image loss) -> projection -> resampler
  llm_qa    as llm, and the LM also learns text-only question answering about the caption (the same scenes)
  llm_conv  as llm, with a causal Conv1d (kernel 8) over the LLM states before the projection
  shipped   the shipped model's LLM (trained, frozen) -> fresh projection -> resampler
  shipped_last  the shipped LLM's state at each object's last word only ("left" of "in the top left") -> Linear
  llm_last  as llm, and only the state at each object's last word -> Linear (the LLM learns with the U-Net)

    python experiments/probe_condition.py cells                 # ~5 min on one core (300 steps x 20 images)
    python experiments/probe_condition.py llm --steps=900
    python experiments/probe_condition.py llm_conv --direct     # no resampler: states -> Linear + sin-cos -> U-Net
    python experiments/probe_condition.py llm --steps=1000 --eval_every=500 --save=llm.png   # a curve, and a picture

Scores are over 60 held-out scenes (30 before the per-object-count breakdown was added)."""
import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402
from llm import LLaMA, LLaMAConfig  # noqa: E402
from checkpoints import load  # noqa: E402
from mmi import MMI, MMIConfig, Resampler  # noqa: E402
import unet as unet_module  # noqa: E402
from diffusion import NoiseSchedule  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vit import sincos_1d, sincos_2d, to_tensor01  # noqa: E402

MODES = ("cells", "objects", "objects_mlp", "objects_resampler", "words", "resampler", "llm", "llm_qa", "llm_conv",
         "shipped", "shipped_last", "llm_last")
COLOURS, SHAPES = list(world.COLOURS), list(world.SHAPES)


class Condition(nn.Module):
    """scenes -> (U-Net context [B, T, C], LM loss) along one of MODES."""

    def __init__(self, mode, cfg: MMIConfig, C, queries, out_std=0.02, init_std=0.02, direct=False, qk_norm=False):
        super().__init__()
        self.mode, self.cfg, self.qa_rng = mode, cfg, random.Random(1)
        self.register_parameter("sink", None)
        self.tok = MMI(cfg).tok
        D, V = cfg.llm["dim"], cfg.llm["vocab_size"]
        if mode.startswith("objects") or mode == "cells":
            E = C if mode in ("cells", "objects") else D
            self.cell, self.colour, self.shape = nn.Embedding(9, E), nn.Embedding(6, E), nn.Embedding(4, E)
            if mode == "objects_mlp":
                self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, C))
            if mode == "objects_resampler":
                self.resampler = Resampler(queries, cfg.decoder.dim, cfg.decoder.layers, cfg.decoder.heads, D, C,
                                           out_std=out_std, init_std=init_std, qk_norm=qk_norm)
            return
        if mode.startswith("llm"):  # llm, llm_qa, llm_conv, llm_last
            self.llm = LLaMA(LLaMAConfig(**cfg.llm))
        elif mode.startswith("shipped"):
            self.shipped = [load(os.path.join(os.path.dirname(__file__), "..", "assets", "tiny")).eval()
                            .requires_grad_(False)]  # a list: not a submodule, so not trained
        else:
            self.emb = nn.Embedding(V + 2, D)
        self.direct = direct = direct or mode in ("words", "shipped_last", "llm_last")
        self.proj = nn.Linear(D, C) if direct else nn.Linear(D, D)
        if mode == "llm_conv":
            self.conv = nn.Conv1d(D, D, 8)
        if not direct:
            self.resampler = Resampler(queries, cfg.decoder.dim, cfg.decoder.layers, cfg.decoder.heads, D, C,
                                       out_std=out_std, init_std=init_std, qk_norm=qk_norm)

    stats, nuisance, scale = None, 0.0, 1.0  # probe variants, set by main() (and the parameter "sink")

    def forward(self, scenes):
        """The U-Net context [B, T, C] (times --ctx_scale, then the --sink tokens) and the LM loss."""
        ctx, lm = self.context(scenes)
        ctx = ctx * self.scale
        if self.sink is not None:
            ctx = torch.cat([ctx, self.sink.expand(len(ctx), -1, -1)], 1)
        return ctx, lm

    def _ids(self, scene):
        c = [COLOURS.index(o[0]) + 1 if o else 0 for o in scene]
        s = [SHAPES.index(o[1]) + 1 if o else 0 for o in scene]
        return torch.tensor(c), torch.tensor(s)

    def qa_loss(self, scenes):
        """LM loss on text-only documents: caption, then 1-3 questions about it and their answers."""
        rng = self.qa_rng
        docs = [self.tok.encode(" ".join([world.caption(s)] + [f"question: {q} answer: {a}" for q, a in
                                         (world.qa_pair(rng, s) for _ in range(rng.randint(1, 3)))]),
                                bos=True, eos=True) for s in scenes]
        T = max(map(len, docs))
        x = torch.tensor([d + [-100] * (T - len(d)) for d in docs])
        h = self.llm.forward_hidden(x.clamp(min=0))
        return F.cross_entropy(self.llm.lm_head(h[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), ignore_index=-100)

    def context(self, scenes):
        if self.mode == "cells":
            c, s = map(torch.stack, zip(*map(self._ids, scenes)))                 # (B, 9) each
            return self.cell.weight + self.colour(c) + self.shape(s), 0.0
        if self.mode.startswith("objects"):
            out = torch.zeros(len(scenes), world.MAX_SHAPES, self.cell.embedding_dim)
            for b, scene in enumerate(scenes):
                c, s = self._ids(scene)
                cells = [i for i, o in enumerate(scene) if o]
                out[b, :len(cells)] = self.cell.weight[cells] + self.colour(c[cells]) + self.shape(s[cells])
                if self.nuisance:  # what else an LLM state holds: here the other objects of the caption
                    codes = self.other_cell.weight[cells] + self.other_colour(c[cells])   # (k, E)
                    out[b, :len(cells)] += self.nuisance * (codes.sum(0) - codes)
            if self.mode == "objects_resampler":
                return self.resampler(out, out.abs().sum(-1) > 0), 0.0
            if self.mode == "objects_mlp":  # zero tokens stay zero
                return self.mlp(out) * (out.abs().sum(-1, keepdim=True) > 0), 0.0
            return out, 0.0
        ids = [self.tok.encode(world.caption(s), bos=True) + [self.cfg.boi_id] for s in scenes]
        T, lens = max(map(len, ids)), torch.tensor([len(i) for i in ids])
        x = torch.tensor([i + [0] * (T - len(i)) for i in ids])                    # (B, T), 0-padded
        lm = torch.zeros(())
        if self.mode.startswith("llm"):
            h = self.llm.forward_hidden(x.clamp(max=self.cfg.llm["vocab_size"] - 1))  # BoI read as the last id
            tgt = x[:, 1:].masked_fill(torch.arange(T - 1) >= lens[:, None] - 2, -100)  # caption tokens only
            lm = F.cross_entropy(self.llm.lm_head(h[:, :-1]).flatten(0, 1), tgt.flatten(), ignore_index=-100)
            if self.mode == "llm_qa" and self.training:
                lm = lm + self.qa_loss(scenes)
        elif self.mode.startswith("shipped"):
            with torch.no_grad():
                m = self.shipped[0]
                h = m.llm.forward_hidden(embeds=m.embed(x))
                if self.stats is not None:
                    h = (h - self.stats[0]) / self.stats[1]
        else:
            h = self.emb(x)
        if self.mode.endswith("_last"):  # only the state at each object's last word ("left" of "in the top left")
            out = h.new_zeros(len(ids), world.MAX_SHAPES, h.shape[-1])
            for b, i in enumerate(ids):
                ends = world.object_words(self.tok, i[:-1])[1]  # i ends with BoI
                out[b, :len(ends)] = h[b, ends]
            return self.proj(out) * (out.abs().sum(-1, keepdim=True) > 0), lm
        if self.mode == "llm_conv":  # causal: each state also sees the 7 before it
            h = h + self.conv(F.pad(h.transpose(1, 2), (7, 0))).transpose(1, 2)
        ar = torch.arange(T)
        h = h[torch.arange(len(ids))[:, None], (lens[:, None] - 1 - ar).clamp(min=0)]  # reversed: BoI first
        mask = ar < lens[:, None]
        if self.direct:  # no mask in the U-Net's cross-attention: padding -> zero keys and values
            return self.proj(h + sincos_1d(T, h.shape[-1])) * mask[..., None], lm
        return self.resampler(self.proj(h) + sincos_1d(T, h.shape[-1]), mask), lm


def add_unet_positions():
    """Probe only: every U-Net transformer block sees its tokens + 2D sin-cos (SD's U-Net knows position only
    through its convolutions' zero padding)."""
    block = unet_module.BasicTransformerBlock.forward

    def forward(self, x, context):  # x (B, H*W, C), square maps
        side = math.isqrt(x.shape[1])
        return block(self, x + sincos_2d(side, side, x.shape[-1], x.device, x.dtype), context)
    unet_module.BasicTransformerBlock.forward = forward


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=MODES)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--direct", action="store_true", help="no decoder resampler (word and LLM modes)")
    p.add_argument("--qk_norm", action="store_true", help="qk-norm in the decoder resampler (as the image resampler)")
    p.add_argument("--layers", type=int, default=None, help="decoder resampler layers (default: the tiny preset's)")
    p.add_argument("--out_std", type=float, default=0.02, help="init std of the decoder resampler's output Linear")
    p.add_argument("--init_std", type=float, default=0.02, help="init std of the decoder resampler's other Linears")
    p.add_argument("--image_loss_weight", type=float, default=10.0)
    p.add_argument("--n_eval", type=int, default=60)
    p.add_argument("--max_objects", type=int, default=world.MAX_SHAPES, help="train on scenes of at most this many")
    p.add_argument("--eval_every", type=int, default=0, help="also score every N steps (the learning curve)")
    p.add_argument("--save", default="", help="write a PNG grid: target row over generated row per example")
    p.add_argument("--sink", type=int, default=0, help="N learned condition-independent tokens after the context")
    p.add_argument("--ctx_scale", type=float, default=1.0, help="multiply the U-Net's context by this")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--whiten", action="store_true", help="shipped modes: standardise each LLM state dimension "
                   "(mean and std of 200 training scenes) before the projection")
    p.add_argument("--freeze_emb", action="store_true", help="object modes: fixed random cell/colour/shape embeddings")
    p.add_argument("--nuisance", type=float, default=0.0, help="object modes: add this x fixed random codes of "
                   "the caption's other objects to each object token")
    p.add_argument("--unet_pos", action="store_true", help="2D sin-cos added to the U-Net's attention tokens")
    a = p.parse_args()
    if a.unet_pos:
        add_unet_positions()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = MMIConfig.from_name("tiny", **({} if a.layers is None else {"decoder.layers": a.layers}))
    unet, sched = UNet(UNetConfig.from_dict(cfg.unet)), NoiseSchedule(**cfg.schedule)
    cond = Condition(a.mode, cfg, unet.cfg.cross_attention_dim, a.queries, a.out_std, a.init_std,
                     a.direct, a.qk_norm)
    if a.nuisance:
        cond.nuisance = a.nuisance
        E = cond.cell.embedding_dim
        cond.other_cell = nn.Embedding(9, E).requires_grad_(False)
        cond.other_colour = nn.Embedding(6, E).requires_grad_(False)
    if a.freeze_emb:
        for e in (cond.cell, cond.colour, cond.shape):
            e.requires_grad_(False)
    if a.whiten:
        with torch.no_grad():
            rng = random.Random(123)
            ids = [cond.tok.encode(world.caption(world.random_scene(rng)), bos=True) for _ in range(200)]
            m = cond.shipped[0]
            h = torch.cat([m.llm.forward_hidden(embeds=m.embed(torch.tensor([i])))[0] for i in ids])
            cond.stats = (h.mean(0), h.std(0) + 1e-5)
    cond.scale = a.ctx_scale
    if a.sink:
        cond.sink = nn.Parameter(torch.randn(a.sink, unet.cfg.cross_attention_dim))
    params = [p for p in [*unet.parameters(), *cond.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    rng, t0 = random.Random(0), time.time()
    for step in range(a.steps):
        scenes = []
        while len(scenes) < a.batch:
            s = world.random_scene(rng)
            if sum(o is not None for o in s) <= a.max_objects:
                scenes.append(s)
        x0 = torch.stack([to_tensor01(world.render(s)) for s in scenes]) * 2 - 1
        noise, t = torch.randn_like(x0), torch.randint(0, sched.N, (a.batch,))
        ctx, lm = cond(scenes)
        image_loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, ctx), sched.target(x0, noise, t))
        opt.zero_grad()
        (lm + a.image_loss_weight * image_loss).backward()
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1, (step + 1) / 30)
        opt.step()
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            evaluate(a, unet, cond, sched, step + 1, t0)
        if step % 50 == 0 or step == a.steps - 1:
            lm = float(lm.detach() if torch.is_tensor(lm) else lm)
            print(f"step {step} image loss {image_loss.item():.4f} lm {lm:.3f} {time.time() - t0:.0f} s", flush=True)
    evaluate(a, unet, cond, sched, a.steps, t0, save=a.save)


@torch.no_grad()
def evaluate(a, unet, cond, sched, step, t0, save=""):
    """Per-cell and occupied-cell accuracy on a.n_eval held-out scenes, overall and by number of objects."""
    unet.eval(), cond.eval()
    exs = world.eval_examples("t2i", a.n_eval)
    ctx, _ = cond([e["scene"] for e in exs])
    noise = torch.randn(len(exs), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imgs = ((sched.sample(lambda x, t: unet(x, t, ctx), noise, steps=25, sampler="ddim") + 1) / 2).clamp(0, 1)
    by_k = {}
    for e, im in zip(exs, imgs):
        pred = world.parse_image(im)
        by_k.setdefault(sum(o is not None for o in e["scene"]), []).append(
            (world.cell_accuracy(pred, e["scene"]), world.cell_accuracy(pred, e["scene"], occupied_only=True)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per_k = ", ".join(f"{k}: {mean([c for c, _ in v]):.2f}/{mean([o for _, o in v]):.2f}"
                      for k, v in sorted(by_k.items()))
    every = [r for v in by_k.values() for r in v]
    print(f"{a.mode}: {step} steps x {a.batch} images, held-out per-cell {mean([c for c, _ in every]):.3f}, "
          f"occupied cells {mean([o for _, o in every]):.3f} (by objects, per-cell/occupied: {per_k}), "
          f"{time.time() - t0:.0f} s", flush=True)
    if save:  # top row: the target scenes, bottom row: what was drawn
        from PIL import Image
        tgt = torch.cat([to_tensor01(world.render(e["scene"])) for e in exs[:16]], 2)
        grid = torch.cat([tgt, torch.cat(list(imgs[:16]), 2)], 1).permute(1, 2, 0)
        Image.fromarray((grid * 255).round().byte().numpy()).resize((grid.shape[1] * 4, grid.shape[0] * 4)).save(save)
    unet.train(), cond.train()


if __name__ == "__main__":
    main()
