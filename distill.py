"""Condition distillation: a warm start of the image decoder's context on a (tiny) Stable Diffusion.

The paper trains the decoder resampler only through the diffusion loss, on a U-Net that already reads a text
encoder's states. In the tiny world the scene behind a caption is known, so that text encoder's output for the caption
(tiny_sd.TextEncoder, which the frozen tiny U-Net draws perfectly) is an exact target for the decoder's condition.
Regressing the condition onto it, with no U-Net pass, teaches the decoder to write before the joint stage starts
(tiny-only: the paper has no such stage; train.py --warm_steps). On training rows the same target exists for every
image with context, a story's next picture included (the caption of the edited scene, read back from the picture):
train.py --distill_weight adds that loss, and --diffusion=False trains on it alone, the U-Net skipped.

    loss = condition_loss(model, text_encoder, captions)   # set-matched MSE of "<s> caption BoI" conditions
    warm_start(model, text_encoder, steps=1500)            # AdamW on the LLM and the decoder resampler
    loss = drawn_loss(model(batch, draw=False), batch["images"], text_encoder)   # every image of a training batch

The U-Net's cross-attention does not see the order of its context, so each example's target tokens are first
assigned to the condition's slots at least cost (the Hungarian method); a slot-by-slot target learns far slower.
"""
import math
import random

import torch

import data
import world


def assignment(cost):
    """The minimum-cost assignment of a square cost matrix (list of lists of floats): col[i] for each row i. The
    Hungarian method with potentials, O(n^3)."""
    n, inf = len(cost), float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # 1-based; match[col] = row
    for row in range(1, n + 1):
        match[0], col0 = row, 0
        slack, used = [inf] * (n + 1), [False] * (n + 1)
        while match[col0]:  # grow an alternating tree until a free column is reached
            used[col0], row0, delta, col1 = True, match[col0], inf, 0
            for col in range(1, n + 1):
                if not used[col]:
                    reduced = cost[row0 - 1][col - 1] - u[row0] - v[col]
                    if reduced < slack[col]:
                        slack[col], way[col] = reduced, col0
                    if slack[col] < delta:
                        delta, col1 = slack[col], col
            for col in range(n + 1):
                if used[col]:
                    u[match[col]] += delta
                    v[col] -= delta
                else:
                    slack[col] -= delta
            col0 = col1
        while col0:  # flip the path
            col1 = way[col0]
            match[col0], col0 = match[col1], col1
    col_of = [0] * n
    for col in range(1, n + 1):
        col_of[match[col] - 1] = col - 1
    return col_of


def set_mse(cond, target):
    """MSE of cond [n, Q, C] against target [n, Q, C] with each example's target tokens reordered to their
    minimum-cost assignment to the condition's slots."""
    cost = torch.cdist(cond.detach().float(), target.float()).square()          # (n, Q, Q)
    order = torch.tensor([assignment(c.tolist()) for c in cost], device=target.device)
    return (cond - target.gather(1, order[..., None].expand_as(target))).square().mean()


@torch.no_grad()
def condition_after(model, context, scene):
    """The decoder's condition [Q, C] for the picture of `scene` drawn after `context` (document items)."""
    ids, images = data.tokenize_document(context + [world.render(scene)], model.tok, model.cfg.n_image_tokens,
                                         eos=False)
    dev = model.boi.device
    batch = {"tokens": torch.tensor([ids], device=dev), "doc_ids": torch.zeros(1, len(ids), dtype=torch.long,
             device=dev), "images": torch.stack(images).to(dev)}
    return model(batch, draw=False)["cond"][-1]                                  # the last picture's


def object_tokens(text_encoder):
    """The text encoder's token for every one-object phrase, then <pad>'s -> ([(colour, shape, cell)], [n + 1, C])."""
    objects = [(c, s, cell) for c in world.COLOURS for s in world.SHAPES for cell in world.CELLS]
    phrases = [f"a {c} {s} in the {cell}." for c, s, cell in objects]
    return objects, torch.cat([text_encoder.encode(phrases)[:, 0], text_encoder.encode([""])[:, 0]])


def read_back(cond, text_encoder):
    """A condition [Q, C] read as a scene: each slot as its nearest token (an object or <pad>). None if two slots
    name one cell. The inverse of the distillation's target, to see what a condition says."""
    objects, tokens = object_tokens(text_encoder)
    scene = [None] * world.GRID * world.GRID
    for i in torch.cdist(cond.float(), tokens.to(cond.device).float()).argmin(1).tolist():
        if i < len(objects):
            colour, shape, cell = objects[i]
            if scene[world.CELLS.index(cell)] is not None:
                return None
            scene[world.CELLS.index(cell)] = (colour, shape)
    return tuple(scene)


def condition_loss(model, text_encoder, captions):
    """The decoder's conditions for standalone "<s> caption BoI" documents (no image anywhere: the LLM's MMFS reads
    its null key) against the text encoder's encodings of the captions, set-matched."""
    tok, n, dev = model.tok, len(captions), model.boi.device
    ids = [tok.encode(c, bos=True, eos=False) + [model.cfg.boi_id] for c in captions]
    T = max(map(len, ids))
    tokens = torch.tensor([i + [tok.pad_id] * (T - len(i)) for i in ids], device=dev)
    h = model.llm.forward_hidden(embeds=model.embed(tokens), ctx=None)
    ends = torch.tensor([len(i) - 1 for i in ids], device=dev)
    cond = model.image_decoder.condition(h, torch.arange(n, device=dev), torch.zeros_like(ends), ends)
    return set_mse(cond, text_encoder.encode(captions).to(cond))


def drawn_loss(out, images01, text_encoder):
    """The set-matched MSE of the conditions that MMI.forward(batch, draw=False) returns against the text encoder's
    encodings of the captions of the scenes in those images (synthetic images: world.parse_image reads them back
    exactly). Zero, with a graph, for a batch with nothing to draw."""
    if out["cond"] is None:
        return out["loss"] * 0.0
    scenes = [world.parse_image(x) for x in images01[out["drawn"]]]
    return set_mse(out["cond"], text_encoder.encode([world.caption(s) for s in scenes]).to(out["cond"]))


def warm_start(model, text_encoder, steps, batch=32, lr=1e-3, seed=0, log=None):
    """`steps` AdamW steps of condition_loss on the captions of random training scenes (warmup 20 steps, cosine to
    10%), the model's parameter groups at one learning rate. Only the LLM and the decoder's context (projection and
    resampler) get gradients; returns the last loss."""
    model.train()
    fused = model.boi.device.type in ("cpu", "cuda")  # one kernel for every parameter, as train.py
    opt = torch.optim.AdamW(model.param_groups(0.01, lr, lr, lr), betas=(0.9, 0.99), fused=fused)  # no grad: skipped
    rng, loss = random.Random(f"warm:{seed}"), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        captions = [world.caption(world.random_scene(rng)) for _ in range(batch)]
        loss = condition_loss(model, text_encoder, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(dict(warm_step=step + 1, condition_mse=loss.item()))
    return None if loss is None else loss.item()
