"""Do a model's image tokens carry the picture? Three measurements of a model folder (default assets/tiny):

    where      "where is the <colour> shape?" for every object of --n held-out scenes: right overall and by the
               number of shapes k (a model that picks one of the shapes at random scores 1/k), what a wrong answer
               names (another shape's cell, or not), and in how many scenes the answer ignores the colour asked
    probe      a ridge-regression probe of every cell's colour (or "empty") from the image tokens, and from the ViT's
               tokens they are resampled from: fitted on 3000 training scenes, scored on 500 held-out ones (always
               guessing "empty" scores 72%)
    attention  the entropy of the resampler's cross-attention over the ViT tokens (uniform: log of their count)

    python experiments/image_tokens.py [CKPT] [--n=100]
"""
import argparse
import math
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import world  # noqa: E402
from generate import generate  # noqa: E402
from vit import to_tensor01  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt", nargs="?", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny"))
p.add_argument("--n", type=int, default=100)
args = p.parse_args()
torch.set_num_threads(2)
model = checkpoints.build_model(ckpt=args.ckpt).eval()
vt = model.visual_tokenizer

# --- where -------------------------------------------------------------------------------------------------------
count = Counter()
rng = random.Random("where-probe")
for _ in range(args.n):
    scene = world.random_scene(rng, "eval")
    k, image, answers = sum(o is not None for o in scene), world.render(scene), set()
    for i, (colour, _) in [(i, o) for i, o in enumerate(scene) if o is not None]:
        items = generate(model, [image, f"question: where is the {colour} shape? answer:"], max_new_tokens=8,
                         max_images=0, temperature=0.0)
        answer = next((x for x in items if isinstance(x, str)), "").strip().split(".")[0]
        cell = answer.removeprefix("in the ")
        answers.add(cell)
        count["asked", k] += 1
        count["right", k] += cell == world.CELLS[i]
        if cell != world.CELLS[i]:
            count["another shape" if cell in world.CELLS and scene[world.CELLS.index(cell)] else "not a shape"] += 1
    if k > 1:
        count["scenes"] += 1
        count["one answer"] += len(answers) == 1
asked, right = sum(count["asked", k] for k in range(1, 5)), sum(count["right", k] for k in range(1, 5))
print(f"where: {right}/{asked} right ({right / asked:.1%}); by shapes in the scene: " +
      ", ".join(f"{k}: {count['right', k]}/{count['asked', k]} (chance {1 / k:.0%})" for k in range(1, 5)) +
      f"; wrong answers name another shape's cell {count['another shape']}, something else {count['not a shape']}; "
      f"the same answer whatever colour is asked in {count['one answer']} of {count['scenes']} scenes of 2+ shapes")


# --- probe -------------------------------------------------------------------------------------------------------
COLOURS = list(world.COLOURS) + [None]


@torch.no_grad()
def features(n, split, seed):
    """n scenes -> (image tokens [n, n_tok * D], ViT tokens [n, (1+g*g) * Dv], cell colours [n, 9])."""
    scenes = [world.random_scene(random.Random(f"{seed}:{j}"), split) for j in range(n)]
    x = torch.stack([to_tensor01(world.render(s)) for s in scenes])
    image_tokens = vt(x)[0].flatten(1)
    vit_tokens = vt.adapter(x)[0].flatten(1)
    return image_tokens, vit_tokens, torch.tensor([[COLOURS.index(o and o[0]) for o in s] for s in scenes])


def probe(train_x, train_y, test_x, test_y, ridge=1.0):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    target = torch.nn.functional.one_hot(train_y, len(COLOURS)).float().flatten(1)            # (n, 9 * 6)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1]), a.T @ target)
    return ((b @ w).view(len(b), -1, len(COLOURS)).argmax(-1) == test_y).float().mean().item()


train, test = features(3000, "train", "probe-train"), features(500, "eval", "probe-test")
print(f"probe: cell colours read linearly from the image tokens {probe(train[0], train[2], test[0], test[2]):.1%}, "
      f"from the ViT tokens {probe(train[1], train[2], test[1], test[2]):.1%} (always 'empty': "
      f"{(test[2] == len(COLOURS) - 1).float().mean():.1%})")

# --- attention ---------------------------------------------------------------------------------------------------
entropies = []


def entropy_hook(attn, inputs, _):
    q, k = attn.queries_keys(*inputs[:2])
    a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)                 # (B, heads, T, S)
    entropies.append((-(a * a.clamp_min(1e-12).log()).sum(-1).mean().item(), a.shape[-1]))


for layer in vt.resampler.layers:
    if layer.cross_attn is not None:
        layer.cross_attn.register_forward_hook(entropy_hook)
with torch.no_grad():
    vt(torch.stack([to_tensor01(world.render(world.random_scene(random.Random(j)))) for j in range(64)]))
print("attention: resampler cross-attention entropy " +
      ", ".join(f"layer {j}: {h:.2f} nats (uniform over {s} tokens {math.log(s):.2f})"
                for j, (h, s) in enumerate(entropies)))
