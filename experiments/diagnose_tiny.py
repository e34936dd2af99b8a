"""
Where a trained tiny model stands, beyond the end-to-end scores of train.py (held-out scenes of world.py):
  reading   teacher-forced accuracy of the caption's colour, shape and cell words (is the image read?)
  binding   linear probes from the LLM state at each object's words to its cell, colour and shape, reading the
            caption alone as text-to-image does (does the LLM bind "a red circle in the top left" into one state?)
  drawing   the image loss at three noise levels with the right caption, another scene's caption and the null
            condition (does the decoder use the caption?)

    python experiments/diagnose_tiny.py                     # assets/tiny
    python experiments/diagnose_tiny.py out-tiny --n=64
    python experiments/diagnose_tiny.py random              # a fresh random tiny model (seed 0): the control
"""
import argparse
import os
import random
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402
from data import tokenize_document  # noqa: E402
from checkpoints import build_model  # noqa: E402
from mmi import flatten_maps  # noqa: E402

WORDS = {**{c: "colour" for c in world.COLOURS}, **{s: "shape" for s in world.SHAPES},
         **{w: "cell" for w in ("top", "middle", "bottom", "centre", "left", "right")}}


def encode(m, tok, items):
    ids, imgs = tokenize_document(items, tok, m.cfg.n_image_tokens)
    h, lay, _ = m.hidden_states(torch.tensor([ids]), torch.stack(imgs) if imgs else None)
    return ids, lay, h, imgs


@torch.no_grad()
def reading(m, tok, n):
    """Per word kind: how often the argmax next token is the caption's token, given the image and the caption so far.
    Words are the tokenizer's pieces (a byte tokenizer scores each word by its first byte)."""
    hits = {}
    for ex in world.eval_examples("i2t", n, size=m.cfg.image_size):
        ids, _, h, _ = encode(m, tok, ex["prompt"] + [ex["answer"]])
        pred = m.logits(h[0, :-1]).argmax(-1)
        cap = tok.encode(ex["answer"], bos=False)
        start = len(ids) - 1 - len(cap)  # position of the first caption token (the sequence ends with </s>)
        if m.cfg.tokenizer == "byte":  # each word by its first byte
            words = [(WORDS.get(w.group(), "other"), start + w.start()) for w in re.finditer(r"\w+", ex["answer"])]
        else:                          # each piece (every word of the world is one piece)
            words = [(WORDS.get(tok.id_to_piece(t).lstrip("\u2581"), "other"), start + j) for j, t in enumerate(cap)]
        for kind, p in words:
            hits.setdefault(kind, []).append(float(pred[p - 1] == ids[p]))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def binding(m, tok, n_train=1200, n_test=300, steps=300):
    """Held-out accuracy of linear probes (softmax regression) from the LLM state at each object's colour word, shape
    word and last word ("left" of "in the top left") to that object's cell, colour and shape. Captions only, then
    BoI."""
    def states(scenes):
        feats, labels = {"colour word": [], "shape word": [], "last word": []}, []
        for scene in scenes:
            ids = tok.encode(world.caption(scene), bos=True) + [m.cfg.boi_id]
            with torch.no_grad():
                h = m.llm.forward_hidden(embeds=m.embed(torch.tensor([ids])))[0]
            objects = [(i, o) for i, o in enumerate(scene) if o]
            starts, ends = world.object_words(tok, ids[:-1])
            if len(starts) != len(objects):
                raise ValueError(f"{len(starts)} object phrases found in the caption of a {len(objects)}-object scene")
            for (cell, (colour, shape)), a, e in zip(objects, starts, ends):
                for name, j in (("colour word", a + 1), ("shape word", a + 2), ("last word", e)):
                    feats[name].append(h[j])
                labels.append((cell, list(world.COLOURS).index(colour), world.SHAPES.index(shape)))
        return {k: torch.stack(v).float() for k, v in feats.items()}, torch.tensor(labels)

    rng = random.Random(0)
    train_x, train_y = states([world.random_scene(rng) for _ in range(n_train)])
    test_x, test_y = states([ex["scene"] for ex in world.eval_examples("t2i", n_test)])
    out = {}
    for where in train_x:
        targets = (("cell", world.GRID * world.GRID), ("colour", len(world.COLOURS)), ("shape", len(world.SHAPES)))
        for k, (what, n_classes) in enumerate(targets):
            probe = torch.nn.Linear(train_x[where].shape[1], n_classes)
            opt = torch.optim.Adam(probe.parameters(), lr=0.05)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(probe(train_x[where]), train_y[:, k]).backward()
                opt.step()
            with torch.no_grad():
                out[(where, what)] = float((probe(test_x[where]).argmax(-1) == test_y[:, k]).float().mean())
    return out


@torch.no_grad()
def drawing(m, tok, n, timesteps=(200, 500, 800)):
    """Image loss (the training objective) of held-out text-to-image examples by condition."""
    cond, x0, dec = [], [], m.image_decoder
    for ex in world.eval_examples("t2i", n, size=m.cfg.image_size):
        ids, lay, h, imgs = encode(m, tok, ex["prompt"] + [world.render(ex["scene"], m.cfg.image_size)])
        cond.append(dec.condition(h, lay.rows, lay.start, lay.pos))
        x0.append(dec.to_latent(torch.stack(imgs)))
    cond, x0 = torch.cat(cond), torch.cat(x0)
    _, maps = m.visual_tokenizer(torch.zeros(1, 3, m.cfg.image_size, m.cfg.image_size))  # no previous image anywhere
    dv, shapes = flatten_maps(maps)
    ctx = dec.context(dv.expand(len(x0), -1, -1), shapes, torch.full((len(x0),), -1))
    g, out = torch.Generator().manual_seed(0), {}
    for t in timesteps:
        noise, tt = torch.randn(x0.shape, generator=g), torch.full((len(x0),), t)
        xt, target = dec.schedule.add_noise(x0, noise, tt), dec.schedule.target(x0, noise, tt)
        for name, c in [("right caption", cond), ("other caption", cond.roll(1, 0)),
                        ("null condition", dec.null_cond.expand_as(cond))]:
            out[(t, name)] = float(((dec.denoise(xt, tt, c, ctx) - target) ** 2).mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "assets", "tiny"))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = (build_model("tiny") if args.model == "random" else build_model(ckpt=args.model)).eval()
    tok = m.tok
    print("reading: teacher-forced accuracy of the next caption token, by word kind")
    for kind, acc in sorted(reading(m, tok, args.n).items()):
        print(f"  {kind:7s} {acc:.3f}")
    print("binding: held-out accuracy of linear probes from the LLM state at an object's word to the object")
    try:
        res = binding(m, tok)
    except ValueError as e:
        print(f"  not measured: {e}")
        res = {}
    for where in dict.fromkeys(w for w, _ in res):
        print(f"  {where:12s} " + "  ".join(f"-> {what} {res[(w, what)]:.2f}" for w, what in res if w == where))
    print("drawing: image loss by condition (lower = better; right < other means the caption is used)")
    res = drawing(m, tok, min(args.n, 64))
    for t in sorted({t for t, _ in res}):
        print(f"  t={t:4d} " + "  ".join(f"{name} {res[(t, name)]:.4f}" for tt, name in res if tt == t))


if __name__ == "__main__":
    main()
