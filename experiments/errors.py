"""Where a model's held-out answers go wrong: questions by kind, and a story's next picture by the cells its sentence
changes and the cells it keeps.

    python experiments/errors.py [CKPT] [--n=50]     # default assets/tiny; the held-out examples of train.py's eval

Greedy text, DDIM 25, guidance 2 (the demo's sampling), eval seed 0: the same examples and draws as
`train.py --eval_only=True`.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import world  # noqa: E402
from generate import SAMPLING, draw_image, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt", nargs="?", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny"))
p.add_argument("--n", type=int, default=50)
args = p.parse_args()
torch.set_num_threads(1)
model = checkpoints.build_model(ckpt=args.ckpt).eval()
opts = dict(temperature=0.0, steps=SAMPLING["steps"], sampler=SAMPLING["sampler"], guidance=SAMPLING["guidance"],
            generator=torch.Generator().manual_seed(0))

right, asked = Counter(), Counter()
for ex in world.eval_examples("qa", args.n):
    question = ex["prompt"][1].removeprefix("question: ").removesuffix(" answer:")
    kind = question.split()[0] if not question.startswith("what") else " ".join(question.split()[:2])
    items = generate(model, ex["prompt"], max_new_tokens=20, max_images=0, **opts)
    answer = next((x for x in items if isinstance(x, str)), "")
    asked[kind] += 1
    right[kind] += world.score(ex, answer)["exact"]
print("questions right, by kind:", ", ".join(f"{k} {right[k]:.0f}/{asked[k]}" for k in sorted(asked)))

wrong = Counter()
opts["generator"].manual_seed(0)
for ex in world.eval_examples("story", args.n):
    drawn = world.parse_image(draw_image(model, ex["prompt"], **opts))
    before, after = world.parse_image(ex["prompt"][-2]), ex["scene"]
    for i in range(world.GRID * world.GRID):
        kind = "changed" if after[i] != before[i] else "kept" if after[i] is not None else None
        if kind:
            wrong[kind, "n"] += 1
            wrong[kind, "wrong"] += drawn[i] != after[i]
print(f"story cells drawn wrong: {wrong['changed', 'wrong']}/{wrong['changed', 'n']} of those the sentence changes, "
      f"{wrong['kept', 'wrong']}/{wrong['kept', 'n']} of the occupied cells it keeps")
