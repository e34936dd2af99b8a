"""Where a model's held-out answers go wrong: captions by the objects in the picture (and how many are a story's
sentence instead: a lone picture also starts a story), questions by kind, and a story's next picture by the cells its
sentence changes and the cells it keeps; and which side of the model a wrong picture comes from: the decoder's
condition (the LLM reading the sentence and the previous picture) is compared with the tiny SD text encoding of every
scene one change away from the previous one (distill.py's set-matched distance), so "nearest the right scene" says
the LLM side applied the right change; and each slot of the condition is read back as its nearest phrase token (one
object, or <pad>), so "reads back as the right objects" says every object, kept or changed, is written right. The
stories are also split by how many objects the picture before the sentence holds (1 to 4).

    python experiments/errors.py [CKPT] [--n=50]     # default assets/tiny; the held-out examples of train.py's eval
    python experiments/errors.py --split=train --n=100   # the conditions only, for stories of training scenes

Greedy text, DDIM 25, guidance 2 (the demo's sampling), eval seed 0: the same examples as `train.py --eval_only=True`
and the same answers; the stories' noise is seeded afresh here, so a story count may differ from train.py's by a
draw or two.
"""
import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import distill  # noqa: E402
import world  # noqa: E402
from generate import SAMPLING, draw_image, generate  # noqa: E402
from tiny_sd import TextEncoder  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt", nargs="?", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny"))
p.add_argument("--n", type=int, default=50)
p.add_argument("--sd_path", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"),
               help="the tiny SD whose text encoder is the condition's target")
p.add_argument("--split", choices=["eval", "train"], default="eval",
               help="train: stories of training scenes (seeded), the condition's read-back only")
args = p.parse_args()
torch.set_num_threads(1)
model = checkpoints.build_model(ckpt=args.ckpt).eval()
opts = dict(temperature=0.0, steps=SAMPLING["steps"], sampler=SAMPLING["sampler"], guidance=SAMPLING["guidance"],
            generator=torch.Generator().manual_seed(0))


def text_answer(prompt, max_new_tokens):
    """The model's greedy text after the prompt, up to a BoI or </s>."""
    items = generate(model, prompt, max_new_tokens=max_new_tokens, max_images=0, **opts)
    return next((x for x in items if isinstance(x, str)), "")


right, asked = Counter(), Counter()
for ex in world.eval_examples("qa", args.n) if args.split == "eval" else []:
    question = ex["prompt"][1].removeprefix("question: ").removesuffix(" answer:")
    kind = question.split()[0] if not question.startswith("what") else " ".join(question.split()[:2])
    answer = text_answer(ex["prompt"], 20)
    asked[kind] += 1
    right[kind] += world.score(ex, answer)["exact"]
if asked:
    print("questions right, by kind:", ", ".join(f"{k} {right[k]:.0f}/{asked[k]}" for k in sorted(asked)))

captions = Counter()
for ex in world.eval_examples("i2t", args.n) if args.split == "eval" else []:
    text = text_answer(ex["prompt"], 160)
    k = sum(obj is not None for obj in ex["scene"])
    captions[k, "n"] += 1
    captions[k, "right"] += world.score(ex, text)["exact"]
    captions[k, "story"] += world.parse_change(text, ex["scene"]) is not None
if captions:
    print("captions, by the objects in the picture: right / a story's sentence instead / pictures:", ", ".join(
        f"{k}: {captions[k, 'right']:.0f}/{captions[k, 'story']}/{captions[k, 'n']}"
        for k in range(1, world.MAX_SHAPES + 1) if captions[k, "n"]))

text_encoder = TextEncoder.from_pretrained(args.sd_path)


def nearest_scene(cond, before):
    """The scene (before, or one change of it) whose text encoding is nearest the condition [Q, C]."""
    scenes = [before] + [scene for options in world.changes(before).values() for _, scene in options]
    targets = text_encoder.encode([world.caption(scene) for scene in scenes]).to(cond)
    distance = [distill.set_mse(cond[None], target[None]).item() for target in targets]
    return scenes[distance.index(min(distance))]


if args.split == "train":
    rng, n_read = random.Random(0), 0
    for _ in range(args.n):
        doc = [None]
        while len(doc) < 3:  # a story with at least one change
            doc = world.synthetic_document(rng, "story")
        after = world.parse_image(doc[-1])
        n_read += distill.read_back(distill.condition_after(model, doc[:-1], after), text_encoder) == after
    print(f"stories of training scenes: the condition reads back as the right objects {n_read}/{args.n}")
    sys.exit()


wrong, sides, by_objects = Counter(), Counter(), Counter()
opts["generator"].manual_seed(0)
for ex in world.eval_examples("story", args.n):
    drawn = world.parse_image(draw_image(model, ex["prompt"], **opts))
    before, after = world.parse_image(ex["prompt"][-2]), ex["scene"]
    cond = distill.condition_after(model, ex["prompt"], after)
    right_change = nearest_scene(cond, before) == after
    sides["condition right"] += right_change
    read_back = distill.read_back(cond, text_encoder) == after
    sides["read back"] += read_back
    n_before = sum(obj is not None for obj in before)  # objects in the picture the sentence changes
    by_objects[n_before, "n"] += 1
    exact = drawn == after
    by_objects[n_before, "exact"] += exact
    by_objects[n_before, "read back"] += read_back
    sides["drawn exact"] += exact
    sides["both"] += right_change and exact
    for i in range(world.GRID * world.GRID):
        kind = "changed" if after[i] != before[i] else "kept" if after[i] is not None else None
        if kind:
            wrong[kind, "n"] += 1
            wrong[kind, "wrong"] += drawn[i] != after[i]
print(f"story cells drawn wrong: {wrong['changed', 'wrong']}/{wrong['changed', 'n']} of those the sentence changes, "
      f"{wrong['kept', 'wrong']}/{wrong['kept', 'n']} of the occupied cells it keeps")
print(f"story, the side of the model: condition nearest the right scene {sides['condition right']}/{args.n} (the LLM "
      f"side), drawn exact {sides['drawn exact']}/{args.n}, exact with the condition right {sides['both']}/"
      f"{sides['condition right']}; the condition reads back as the right objects {sides['read back']}/{args.n}")
split = ", ".join(f"{k}: {by_objects[k, 'exact']}/{by_objects[k, 'read back']}/{by_objects[k, 'n']}"
                  for k in range(1, world.MAX_SHAPES + 1) if by_objects[k, "n"])
print(f"story, by the objects in the picture before the sentence: drawn exact / reads back right / stories: {split}")
