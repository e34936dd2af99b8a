"""The demo's pictures from the condition's side. For each picture `python sample.py` draws (assets/demo.txt), the
decoder's condition after the prompt (the earlier drawn pictures replaced by the right ones) is read back slot by slot:
each object slot's nearest one-object token of the tiny SD's text encoder, its distance, and the runner-up. Then the
picture is drawn twice with the same noise: with the model's condition, and with the exact text encoding of the right
scene in its place. Exact with the encoding but not with the condition: the LLM side wrote it wrong.

    python experiments/demo_condition.py [CKPT]     # default assets/tiny; ~15 s
"""
import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import distill  # noqa: E402
import world  # noqa: E402
from generate import SAMPLING, draw_image  # noqa: E402
from tiny_sd import TextEncoder  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt", nargs="?", default=str(ROOT / "assets" / "tiny"))
p.add_argument("--sd_path", default=str(ROOT / "assets" / "tiny-sd"))
p.add_argument("--prompts", default=str(ROOT / "assets" / "demo.txt"))
args = p.parse_args()
torch.set_num_threads(1)
model = checkpoints.build_model(ckpt=args.ckpt).eval()
text_encoder = TextEncoder.from_pretrained(args.sd_path)
objects, tokens = distill.object_tokens(text_encoder)
sampling = {k: SAMPLING[k] for k in ("steps", "sampler", "guidance")}
decoder = model.image_decoder


def pictures_to_draw(prompt):
    """-> [(context items, the scene the picture must show)], one per bare <img>; the world's rules read each sentence
    (parse_caption, parse_change) and each given picture (parse_image); a drawn picture is taken as drawn right."""
    items, scene, out = [], None, []
    for piece in filter(None, (x.strip() for x in re.split(r"(<img(?::[^>]*)?>)", prompt))):
        if piece == "<img>":
            out.append((list(items), scene))
            items.append(world.render(scene))
        elif piece.startswith("<img:"):
            items.append(Image.open(Path(args.prompts).parent / piece[5:-1]).convert("RGB"))
            scene = world.parse_image(items[-1])
        else:
            items.append(piece)
            scene = world.parse_caption(piece) or world.parse_change(piece, scene)
    return out


def drawn(context, cond=None):
    """The scene drawn after context (noise seed 0), with the decoder's condition replaced by cond if given."""
    own = decoder.condition
    if cond is not None:
        decoder.condition = lambda *a: cond[None]
    try:
        img = draw_image(model, context, generator=torch.Generator().manual_seed(0), **sampling)
    finally:
        decoder.condition = own
    return world.parse_image(img)


name = lambda i: "<pad>" if i == len(objects) else "%s %s in the %s" % objects[i]  # noqa: E731
chunks = [re.sub(r"^#.*\n", "", c.strip()) for c in Path(args.prompts).read_text().split("\n---\n")]
for k, prompt in enumerate(chunks, 1):
    for j, (context, scene) in enumerate(pictures_to_draw(prompt), 1):
        cond = distill.condition_after(model, context, scene)
        print(f"prompt {k}, picture {j}: should show {world.caption(scene)}")
        d = torch.cdist(cond.float(), tokens.float())                            # (Q, objects + 1)
        for slot in range(len(cond)):
            (d0, d1), (i0, i1) = d[slot].topk(2, largest=False)
            if i0 < len(objects):
                print(f"  slot {slot:2d}: {name(i0):34s} {d0:.2f}   next: {name(i1):34s} {d1:.2f}")
        exact = text_encoder.encode([world.caption(scene)])[0].to(cond)
        for what, c in (("the model's condition", None), ("the exact encoding", exact)):
            got = drawn(context, c)
            said = "exact" if got == scene else world.caption(got) if any(got) else "nothing"
            print(f"  drawn with {what}: {said}")
