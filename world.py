"""The synthetic world of the tiny model: scenes, the texts that describe them (captions, questions, stories), drawing
and reading back (render / parse_image), held-out eval examples and the exact scorer.

1-4 shapes (circle, square, triangle) in 5 colours on a 3x3 grid, drawn at 32x32 px on black (11-px cells; big enough
that `parse_image` reads shapes back from noisy, blurred generations, small enough for a tiny pixel-space diffusion
model on a CPU). A scene is a tuple of 9 cells in reading order, each None or (colour, shape); colours are unique
within a scene so "the red circle" names one object. One scene in 10 (by a hash of its caption) is held out for
evaluation; training documents never contain a held-out scene. A document is a list of items, str or PIL image
(data.tokenize_document turns it into tokens).
"""
import hashlib
import random
import re
from collections import defaultdict
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

GRID = 3
IMAGE_SIZE = 32
BACKGROUND = (0, 0, 0)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
           "white": (230, 230, 230)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top middle", "top right", "middle left", "centre", "middle right",
         "bottom left", "bottom middle", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4
HELD_OUT = 10  # one scene in HELD_OUT goes to the eval split
KINDS = {"t2i": 0.3, "i2t": 0.3, "qa": 0.2, "story": 0.2}  # default training mixture of document kinds
MAX_DOC_IMAGES = 3  # the most images in one synthetic document: a story's first picture and up to 2 more


def make_scene(objects):
    """{"top left": ("red", "circle"), ...} -> scene tuple."""
    scene = [None] * GRID * GRID
    for cell, obj in objects.items():
        scene[CELLS.index(cell)] = tuple(obj)
    return tuple(scene)


def _objects(scene):
    return [(i, obj) for i, obj in enumerate(scene) if obj is not None]


def caption(scene):
    """'a red circle in the top left, a blue square in the centre and a green triangle in the bottom right.'"""
    parts = [f"a {c} {s} in the {CELLS[i]}" for i, (c, s) in _objects(scene)]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


_OBJECT = re.compile(r"a (\w+) (\w+) in the ([a-z ]+)")


def parse_caption(text):
    """Exact inverse of `caption`: the scene, or None if text is not a canonical caption."""
    text = text.strip()
    if not text.endswith("."):
        return None
    scene = [None] * GRID * GRID
    for part in re.split(r", | and ", text[:-1]):
        m = _OBJECT.fullmatch(part)
        if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in CELLS:
            return None
        scene[CELLS.index(m[3])] = (m[1], m[2])
    scene = tuple(scene)
    return scene if caption(scene) == text else None  # canonical order, no duplicates


def object_words(tok, ids):
    """Positions in a caption's ids of each object phrase "a <colour> <shape> in the <cell>": (its "a", its last
    word), in caption order. Needs a tokenizer with one piece per word (the world tokenizer)."""
    words = [tok.id_to_piece(t).lstrip("\u2581") for t in ids]
    starts = [j for j, w in enumerate(words) if w == "a"]
    ends = [j for j in range(len(words) - 1) if words[j + 1] in (",", "and", ".")]
    if not starts or len(starts) != len(ends):
        raise ValueError(f"cannot find the object phrases in {words} (needs a tokenizer with a piece per word)")
    return starts, ends


def split_of(scene):
    """'eval' for one scene in HELD_OUT (stable hash of the caption), else 'train'."""
    h = int(hashlib.md5(caption(scene).encode()).hexdigest(), 16)
    return "eval" if h % HELD_OUT == 0 else "train"


def random_scene(rng, split="train", min_shapes=1):
    while True:
        k = rng.randint(min_shapes, MAX_SHAPES)
        scene = [None] * GRID * GRID
        for cell, colour in zip(rng.sample(range(GRID * GRID), k), rng.sample(list(COLOURS), k)):
            scene[cell] = (colour, rng.choice(SHAPES))
        scene = tuple(scene)
        if split_of(scene) == split:
            return scene


def changes(scene):
    """Every one-step change of a scene, grouped by kind: {kind: [(sentence, new scene), ...]}."""
    out = defaultdict(list)
    used = {c for _, (c, _) in _objects(scene)}
    empty = [i for i, obj in enumerate(scene) if obj is None]

    def edit(i, obj, j=None):
        s = list(scene)
        s[i] = obj
        if j is not None:
            s[i], s[j] = None, obj
        return tuple(s)

    for i, (c, s) in _objects(scene):
        name = f"the {c} {s}"
        out["move"] += [(f"{name} moves to the {CELLS[j]}.", edit(i, (c, s), j)) for j in empty]
        out["colour"] += [(f"{name} turns {c2}.", edit(i, (c2, s))) for c2 in COLOURS if c2 not in used]
        out["shape"] += [(f"{name} becomes a {s2}.", edit(i, (c, s2))) for s2 in SHAPES if s2 != s]
        if len(used) > 1:
            out["remove"].append((f"{name} disappears.", edit(i, None)))
    if len(used) < MAX_SHAPES:
        out["add"] += [(f"a {c} {s} appears in the {CELLS[j]}.", edit(j, (c, s)))
                       for j in empty for c in COLOURS if c not in used for s in SHAPES]
    return out


def parse_change(text, scene):
    """Exact inverse of a story sentence: the scene after the change, or None."""
    return {t: s for opts in changes(scene).values() for t, s in opts}.get(text.strip())


def random_change(rng, scene, split="train"):
    """(sentence, new scene) with a uniformly chosen kind of change; None if no change stays in the split."""
    groups = list(changes(scene).items())
    rng.shuffle(groups)
    for _, opts in groups:
        opts = [o for o in opts if split_of(o[1]) == split]
        if opts:
            return rng.choice(opts)
    return None


def qa_pair(rng, scene):
    """(question, answer) about one detail of the scene."""
    kind = rng.choice(("colour", "shape", "count", "where"))
    if kind == "count":
        question = "how many shapes are there?"
    elif kind == "where":
        question = f"where is the {rng.choice(_objects(scene))[1][0]} shape?"
    else:
        i = rng.choice(_objects(scene))[0] if rng.random() < 0.7 else rng.randrange(GRID * GRID)  # mostly occupied
        question = f"what {kind} is in the {CELLS[i]}?"
    return question, answer(question, scene)


_QUESTION = re.compile(r"what (colour|shape) is in the ([a-z ]+)\?|where is the (\w+) shape\?|"
                       r"how many shapes are there\?")


def answer(question, scene):
    """The answer to a question of `qa_pair` about a scene, or None if it is not one of its questions (or asks where
    a colour is that the scene does not hold)."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None or (m[2] is not None and m[2] not in CELLS):
        return None
    if m[1]:
        obj = scene[CELLS.index(m[2])]
        return "nothing." if obj is None else f"{obj[0]}." if m[1] == "colour" else f"a {obj[1]}."
    if m[3]:
        return next((f"in the {CELLS[i]}." for i, (c, _) in _objects(scene) if c == m[3]), None)
    return f"{NUMBERS[len(_objects(scene))]}."


def _cell_bounds(i, size):
    r, c = divmod(i, GRID)
    return round(r * size / GRID), round((r + 1) * size / GRID), round(c * size / GRID), round((c + 1) * size / GRID)


def _draw(draw, i, shape, size, fill):
    y0, y1, x0, x1 = _cell_bounds(i, size)
    m = max(1, round((x1 - x0) * 0.1))  # margin >= 1 px keeps neighbours apart (and lets parse_image shift by 1)
    x0, y0, x1, y1 = x0 + m, y0 + m, x1 - m - 1, y1 - m - 1  # inclusive box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene, size=IMAGE_SIZE):
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, (c, s) in _objects(scene):
        _draw(draw, i, s, size, COLOURS[c])
    return img


@lru_cache(maxsize=8)
def _templates(size):
    """Per cell: its bounds, the smallest shape's area in pixels and, per shape, the shape as `render` draws it,
    sharp and blurred (a generated image is rarely sharp), shifted by up to 1 px, each flattened to a unit vector:
    shape (27, cell pixels)."""
    out = []
    for i in range(GRID * GRID):
        y0, y1, x0, x1 = _cell_bounds(i, size)
        masks, area = {}, float("inf")
        for s in SHAPES:
            img = Image.new("L", (size, size), 0)
            _draw(ImageDraw.Draw(img), i, s, size, 255)
            area = min(area, float((np.asarray(img) > 0).sum()))
            views = []
            for blur in (0, 0.6, 1.2):
                m = np.asarray(img.filter(ImageFilter.GaussianBlur(blur * size / 32)) if blur else img, np.float32)
                m = m[y0:y1, x0:x1] / 255
                views += [np.roll(m, (dy, dx), (0, 1)).ravel() for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            views = np.stack(views)
            masks[s] = views / np.linalg.norm(views, axis=1, keepdims=True)
        out.append(((y0, y1, x0, x1), area, masks))
    return out


def _as_array(img):
    """PIL image, HxWx3 array (uint8 or float in [0,1]) or a [3,H,W] tensor in [0,1] -> HxWx3 float32 in [0,1]."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu().permute(1, 2, 0).numpy()
    img = np.asarray(img)
    return img.astype(np.float32) / 255 if img.dtype == np.uint8 else img.astype(np.float32)


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255


def parse_image(img):
    """Read a scene back from pixels. Per cell: a shape is there if enough pixels are bright (the background is
    black, every palette colour bright); its shape is the template best correlated with the cell's brightness above
    the background level (brightness-invariant, tolerant to noise, blur and 1-px shifts); its colour is the palette
    colour nearest the mean of the cell's brightest pixels."""
    x = _as_array(img)
    assert x.shape[0] == x.shape[1], "parse_image expects a square image"
    v = x.max(-1)  # (H, W) brightness: decides presence and which pixels carry the colour
    w = x.mean(-1)  # (H, W) less noisy brightness for the shape; its median is the background (most pixels are)
    w = np.clip(w - np.median(w), 0, None)
    scene = []
    for (y0, y1, x0, x1), area, masks in _templates(x.shape[0]):
        cell = v[y0:y1, x0:x1]
        if np.clip((cell - 0.25) / 0.5, 0, 1).sum() < 0.35 * area:
            scene.append(None)
            continue
        f = w[y0:y1, x0:x1].ravel()
        shape = max(SHAPES, key=lambda s: (masks[s] @ f).max())
        pix = x[y0:y1, x0:x1][cell > 0.6 * cell.max()]
        colour = list(COLOURS)[int(((_PALETTE - pix.mean(0)) ** 2).sum(1).argmin())]
        scene.append((colour, shape))
    return tuple(scene)


def synthetic_document(rng, kind, split="train", size=IMAGE_SIZE, story_min_shapes=1):
    """One document of a kind: 't2i' caption then image, 'i2t' image then caption, 'qa' image then 1-3 question /
    answer pairs, 'story' an image then 1-2 times (a sentence that changes one thing, the image after it).
    story_min_shapes: the fewest objects in a story's first scene (more: harder stories; 1: the world's own mix)."""
    scene = random_scene(rng, split, story_min_shapes if kind == "story" else 1)
    if kind == "t2i":
        return [caption(scene), render(scene, size)]
    if kind == "i2t":
        return [render(scene, size), caption(scene)]
    if kind == "qa":
        qas = [qa_pair(rng, scene) for _ in range(rng.randint(1, 3))]
        return [render(scene, size), " ".join(f"question: {q} answer: {a}" for q, a in qas)]
    if kind == "story":
        doc = [render(scene, size)]
        for _ in range(rng.randint(1, MAX_DOC_IMAGES - 1)):
            step = random_change(rng, scene, split)
            if step is None:
                break
            sentence, scene = step
            doc += [sentence, render(scene, size)]
        return doc
    raise ValueError(f"unknown document kind {kind!r}; expected one of {list(KINDS)}")


def eval_examples(kind, n, seed=0, size=IMAGE_SIZE):
    """n held-out examples of a kind, each a dict: "kind", "prompt" (document items to condition on), "scene" (the
    scene the answer is about), "noise_seed" (the seed of its own sampling noise: a drawn picture then depends on
    the example alone) and, for text answers, "answer". The model continues the prompt with text (i2t, qa) or an
    image (t2i, story: the image after the last sentence); `score` grades the continuation."""
    rng = random.Random(f"eval:{seed}:{kind}")
    out = []
    while len(out) < n:
        scene = random_scene(rng, "eval")
        if kind == "i2t":
            ex = {"prompt": [render(scene, size)], "answer": caption(scene)}
        elif kind == "t2i":
            ex = {"prompt": [caption(scene)]}
        elif kind == "qa":
            q, a = qa_pair(rng, scene)
            ex = {"prompt": [render(scene, size), f"question: {q} answer:"], "answer": a}
        elif kind == "story":
            prompt = [render(scene, size)]
            for _ in range(rng.randint(1, 2)):
                step = random_change(rng, scene, "eval")
                if step is None:
                    break
                prompt += [step[0], render(step[1], size)]
                scene = step[1]
            if len(prompt) == 1:
                continue
            ex = {"prompt": prompt[:-1]}  # the last image is what the model must draw
        else:
            raise ValueError(f"unknown eval kind {kind!r}")
        noise_seed = int(hashlib.md5(f"eval:{seed}:{kind}:{len(out)}".encode()).hexdigest(), 16) % 2**63
        out.append({"kind": kind, "scene": scene, **ex, "noise_seed": noise_seed})
    return out


def cell_accuracy(pred, target, occupied_only=False):
    """Fraction of the 9 cells where pred and target agree (colour and shape, or both empty). occupied_only: only
    cells non-empty in either scene (a blank image then scores 0 instead of (9 - k) / 9)."""
    cells = [i for i in range(GRID * GRID) if not occupied_only or pred[i] is not None or target[i] is not None]
    return sum(pred[i] == target[i] for i in cells) / max(1, len(cells))


def _first_sentence(text):
    text = text.strip().lower()
    return text[:text.index(".") + 1] if "." in text else text


def score(example, output):
    """Grade a model's continuation (text for i2t / qa, an image for t2i / story) -> dict of metrics in [0, 1]."""
    if example["kind"] == "i2t":  # caption exact match (the whole scene must parse back)
        return {"exact": float(parse_caption(output) == example["scene"])}
    if example["kind"] == "qa":
        return {"exact": float(_first_sentence(output) == example["answer"])}
    pred = parse_image(output)
    return {"exact": float(pred == example["scene"]), "cell_acc": cell_accuracy(pred, example["scene"]),
            "object_acc": cell_accuracy(pred, example["scene"], occupied_only=True)}

