"""The demo's five prompts (assets/demo.txt) rebuilt on other held-out scenes, each graded by the world's exact scorer:
is `python sample.py` right by luck of its scenes, or on any scene?

    caption    <img> -> the caption
    question   <img> question: where is the <colour> shape? answer:   (the colour of a random shape)
    draw       <caption> <img>
    story      <img> <change> <img> <change> <img>   (two changes of the eval split, as the demo's story)
    own story  <img> <change> <img> <change> <img>   the model draws both pictures, the second after its own first;
               right only if both are

    python experiments/demo_style.py [CKPT] [--n=20]     # default assets/tiny; seed 'demo-style', the demo's sampling

Each prompt is exact or not (a picture: every cell right). Prints the share right per prompt and the scenes with
all five right.
"""
import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import world  # noqa: E402
from generate import SAMPLING, as_8bit, draw_image, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt", nargs="?", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny"))
p.add_argument("--n", type=int, default=20)
args = p.parse_args()
torch.set_num_threads(1)
model = checkpoints.build_model(ckpt=args.ckpt).eval()
gen = torch.Generator().manual_seed(0)
opts = dict(SAMPLING, generator=gen)


def text_after(prompt):
    items = generate(model, prompt, max_new_tokens=90, max_images=0, stop_at=".", **opts)
    return next((x for x in items if isinstance(x, str)), "")


def drawn_right(picture, scene):
    return world.score({"kind": "t2i", "scene": scene}, picture)["exact"] == 1


rng, right, all_five, scenes = random.Random("demo-style"), Counter(), 0, 0
while scenes < args.n:
    scene = world.random_scene(rng, "eval")
    steps = []  # two changes that stay in the eval split, as the demo's story
    for _ in range(2):
        step = world.random_change(rng, steps[-1][1] if steps else scene, "eval")
        if step is None:
            break
        steps.append(step)
    if len(steps) < 2:
        continue
    scenes += 1
    (s1, scene1), (s2, scene2) = steps
    img = world.render(scene)
    colour = rng.choice([obj for obj in scene if obj is not None])[0]
    question = f"where is the {colour} shape?"
    ok = {
        "caption": world.score({"kind": "i2t", "scene": scene}, text_after([img]))["exact"] == 1,
        "question": world.score({"kind": "qa", "scene": scene, "answer": world.answer(question, scene)},
                                text_after([img, f"question: {question} answer:"]))["exact"] == 1,
        "draw": drawn_right(draw_image(model, [world.caption(scene)], **opts), scene),
        "story": drawn_right(draw_image(model, [img, s1, world.render(scene1), s2], **opts), scene2),
    }
    own = draw_image(model, [img, s1], **opts)
    ok["own story"] = drawn_right(own, scene1) and drawn_right(
        draw_image(model, [img, s1, as_8bit(own), s2], **opts), scene2)
    right.update(k for k, v in ok.items() if v)
    all_five += all(ok.values())
print(f"{args.ckpt}: {args.n} held-out scenes (seed 'demo-style'), right per prompt: "
      + ", ".join(f"{k} {right[k]}/{args.n}" for k in ("caption", "question", "draw", "story", "own story"))
      + f"; all five right in {all_five}/{args.n}")
