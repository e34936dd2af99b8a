"""
Where a trained tiny model stands, beyond the end-to-end scores of train.py (held-out scenes of data.py):
  reading   teacher-forced accuracy of the caption's colour, shape and cell words (is the image read?)
  drawing   the image loss at three noise levels with the right caption, another scene's caption and the null
            condition (does the decoder use the caption?)

    python bench/diagnose_tiny.py                     # assets/tiny
    python bench/diagnose_tiny.py out-tiny --n=64
"""
import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from mmi import MMI  # noqa: E402

WORDS = {**{c: "colour" for c in data.COLOURS}, **{s: "shape" for s in data.SHAPES},
         **{w: "cell" for w in ("top", "middle", "bottom", "centre", "left", "right")}}


def encode(m, tok, items):
    ids, imgs = m.encode_document(items, tok)
    tokens = torch.tensor([ids])
    emb, maps = m.encode_images(torch.stack(imgs)) if imgs else (None, None)
    lay = m.layout(tokens)
    ctx = None if maps is None else m.visual_context(lay, *m.flatten_maps(maps[1:]), 1)
    return ids, lay, m.llm.forward_hidden(embeds=m.embed(tokens, emb), ctx=ctx), imgs


@torch.no_grad()
def reading(m, tok, n):
    """Per word kind: how often the argmax next token is the caption's token, given the image and the caption so far.
    Words are the tokenizer's pieces (a byte tokenizer scores each word by its first byte)."""
    hits = {}
    for ex in data.eval_examples("i2t", n, size=m.cfg.image_size):
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


@torch.no_grad()
def drawing(m, tok, n, timesteps=(200, 500, 800)):
    """Image loss (the training objective) of held-out text-to-image examples by condition."""
    cond, x0 = [], []
    for ex in data.eval_examples("t2i", n, size=m.cfg.image_size):
        ids, lay, h, imgs = encode(m, tok, ex["prompt"] + [data.render(ex["scene"], m.cfg.image_size)])
        cond.append(m.condition(h, lay["rows"], lay["start"], lay["pos"]))
        x0.append(m.to_latent(torch.stack(imgs)))
    cond, x0 = torch.cat(cond), torch.cat(x0)
    _, maps = m.encode_images(torch.zeros(1, 3, m.cfg.image_size, m.cfg.image_size))  # no previous image anywhere
    dv, shapes = m.flatten_maps(maps)
    values, visible = m.decoder_values(dv.expand(len(x0), -1, -1), shapes, torch.full((len(x0),), -1))
    g, out = torch.Generator().manual_seed(0), {}
    for t in timesteps:
        noise, tt = torch.randn(x0.shape, generator=g), torch.full((len(x0),), t)
        xt, target = m.schedule.add_noise(x0, noise, tt), m.schedule.target(x0, noise, tt)
        for name, c in [("right caption", cond), ("other caption", cond.roll(1, 0)),
                        ("null condition", m.null_cond.expand_as(cond))]:
            out[(t, name)] = float(((m.denoise(xt, tt, c, values, visible) - target) ** 2).mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "assets", "tiny"))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = MMI.load(args.model).eval()
    tok = m.tokenizer()
    print("reading: teacher-forced accuracy of the next caption token, by word kind")
    for kind, acc in sorted(reading(m, tok, args.n).items()):
        print(f"  {kind:7s} {acc:.3f}")
    print("drawing: image loss by condition (lower = better; right < other means the caption is used)")
    res = drawing(m, tok, min(args.n, 64))
    for t in sorted({t for t, _ in res}):
        print(f"  t={t:4d} " + "  ".join(f"{name} {res[(t, name)]:.4f}" for tt, name in res if tt == t))


if __name__ == "__main__":
    main()
