"""Data for mmi: the synthetic world and its scorers, real interleaved corpora, tokenising and packing.

A document is a list of items, each a `str` (text) or a `PIL.Image.Image`. Tokenised, it reads
    <s> text ... <BoI> <|image|> x n_image_tokens ... text </s>
Documents are concatenated and cut into rows of `seq_len` tokens; a cut never splits an image (it moves back to the
image's BoI and the rest starts the next row); rows are right-padded with pad_id. A document longer than seq_len is
skipped and counted (it could never be seen whole).

Batch format (what `collate` returns; B rows of T = seq_len tokens holding N images in all):
    tokens      LongTensor  [B, T]        token ids, pad_id after the last document of a row
    doc_ids     LongTensor  [B, T]        document index within the row (0, 1, ...); -1 on padding. A row may start
                                          with the tail of a document cut from the previous row (it has no <s>).
    images      FloatTensor [N, 3, H, W]  RGB in [0, 1], ordered by row, then by position in the row
    image_rows  LongTensor  [N]           the row of each image
    image_pos   LongTensor  [N]           position of each image's BoI in its row; its <|image|> tokens follow it
    skipped     list[(where, reason)]     bad data met while producing these rows ("file.jsonl:12", "missing image");
                                          feed it to `Stats.add` and print `Stats.report()` at the end of an epoch.

The synthetic world: 1-4 shapes (circle, square, triangle) in 5 colours on a 3x3 grid, drawn at 32x32 px on black
(11-px cells; big enough that `parse_image` reads shapes back from noisy, blurred generations, small enough for a tiny
pixel-space diffusion model on a CPU). A scene is a tuple of 9 cells in reading order, each None or (colour, shape);
colours are unique within a scene so "the red circle" names one object. One scene in 10 (by a hash of its caption)
is held out for evaluation; training documents never contain a held-out scene.
"""
import hashlib
import json
import random
import re
import warnings
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import count
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset, IterableDataset, get_worker_info

# ----------------------------------------------------------------------------------------------------------------------
# The synthetic world

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


def split_of(scene):
    """'eval' for one scene in HELD_OUT (stable hash of the caption), else 'train'."""
    h = int(hashlib.md5(caption(scene).encode()).hexdigest(), 16)
    return "eval" if h % HELD_OUT == 0 else "train"


def random_scene(rng, split="train"):
    while True:
        k = rng.randint(1, MAX_SHAPES)
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
    objects = _objects(scene)
    if kind == "count":
        return "how many shapes are there?", f"{NUMBERS[len(objects)]}."
    if kind == "where":
        i, (c, _) = rng.choice(objects)
        return f"where is the {c} shape?", f"in the {CELLS[i]}."
    i = rng.choice(objects)[0] if rng.random() < 0.7 else rng.randrange(GRID * GRID)  # mostly occupied cells
    obj = scene[i]
    answer = "nothing" if obj is None else obj[0] if kind == "colour" else f"a {obj[1]}"
    return f"what {kind} is in the {CELLS[i]}?", f"{answer}."


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
    """Per cell: its bounds, the smallest shape's area in pixels and, per shape, the shape as `render` draws it, sharp and blurred (a generated image is
    rarely sharp), shifted by up to 1 px, each flattened to a unit vector: shape (27, cell pixels)."""
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


def synthetic_document(rng, kind, split="train", size=IMAGE_SIZE):
    """One document of a kind: 't2i' caption then image, 'i2t' image then caption, 'qa' image then 1-3 question /
    answer pairs, 'story' an image then 1-2 times (a sentence that changes one thing, the image after it)."""
    scene = random_scene(rng, split)
    if kind == "t2i":
        return [caption(scene), render(scene, size)]
    if kind == "i2t":
        return [render(scene, size), caption(scene)]
    if kind == "qa":
        qas = [qa_pair(rng, scene) for _ in range(rng.randint(1, 3))]
        return [render(scene, size), " ".join(f"question: {q} answer: {a}" for q, a in qas)]
    if kind == "story":
        doc = [render(scene, size)]
        for _ in range(rng.randint(1, 2)):
            step = random_change(rng, scene, split)
            if step is None:
                break
            sentence, scene = step
            doc += [sentence, render(scene, size)]
        return doc
    raise ValueError(f"unknown document kind {kind!r}; expected one of {list(KINDS)}")


def eval_examples(kind, n, seed=0, size=IMAGE_SIZE):
    """n held-out examples of a kind, each a dict: "kind", "prompt" (document items to condition on), "scene" (the
    scene the answer is about) and, for text answers, "answer". The model continues the prompt with text (i2t, qa)
    or an image (t2i, story: the image after the last sentence); `score` grades the continuation."""
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
        out.append({"kind": kind, "scene": scene, **ex})
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


# ----------------------------------------------------------------------------------------------------------------------
# Real corpora: JSON lines, one document per line, image paths relative to the .jsonl file. Three layouts:
#   simple: {"items": [{"text": "..."}, {"image": "a.jpg"}, ...]}                       (kept in order)
#   MMC4:   {"text_list": [...], "image_info": [{"image_name": "a.jpg", "matched_text_index": 0, "matched_sim": 0.3}]}
#           (images with matched_sim < min_sim dropped; each placed before or after its sentence at random)
#   pair:   {"image": "a.jpg", "caption": "..."}          (caption lowercased; image first or caption first at random)
# At most max_images images per document (the first ones). Bad lines are skipped and counted, never raised.

class Stats:
    """Skipped documents: (where, reason) records, e.g. ("docs.jsonl:12", "missing image: a.jpg")."""

    def __init__(self):
        self.skipped = []

    def skip(self, where, reason):
        self.skipped.append((where, reason))

    def add(self, records):
        self.skipped += [tuple(r) for r in records]

    def take(self):
        out, self.skipped = self.skipped, []
        return out

    def report(self, max_lines=50):
        if not self.skipped:
            return "skipped 0 documents"
        kinds = Counter(reason.split(":")[0] for _, reason in self.skipped)
        lines = [f"skipped {len(self.skipped)} documents (" + ", ".join(f"{k}: {n}" for k, n in kinds.items()) + ")"]
        lines += [f"  {where}: {reason}" for where, reason in self.skipped[:max_lines]]
        if len(self.skipped) > max_lines:
            lines.append(f"  ... and {len(self.skipped) - max_lines} more")
        return "\n".join(lines)


def _layout(obj, rng, max_images, min_sim):
    """One JSON object -> document items (str text, Path image), in reading order."""
    if "items" in obj:
        items = [it["text"] if "text" in it else Path(it["image"]) for it in obj["items"]]
    elif "text_list" in obj:
        texts = list(obj["text_list"])
        before, after = defaultdict(list), defaultdict(list)
        infos = [i for i in obj.get("image_info") or [] if i.get("matched_sim", 1.0) >= min_sim][:max_images]
        for info in infos:
            j = info["matched_text_index"]
            if not 0 <= j < len(texts):
                raise ValueError(f"matched_text_index {j} out of range")
            (before if rng.random() < 0.5 else after)[j].append(Path(info["image_name"]))
        items = [x for j, t in enumerate(texts) for x in before[j] + [t] + after[j]]
    elif "image" in obj and "caption" in obj:
        cap, img = obj["caption"].lower(), Path(obj["image"])
        items = [img, cap] if rng.random() < 0.5 else [cap, img]
    else:
        raise ValueError("no 'items', 'text_list' or 'image'+'caption'")
    if not all(isinstance(x, (str, Path)) for x in items):
        raise ValueError("text must be a string")
    out, n_images = [], 0
    for x in items:  # drop empty text and images past max_images
        n_images += isinstance(x, Path)
        if (isinstance(x, str) and x.strip()) or (isinstance(x, Path) and n_images <= max_images):
            out.append(x)
    return out


def load_image(path, size=None):
    """RGB PIL image; with size: resized (shorter side) and centre-cropped to size x size."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    if size:
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        img = img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))
    return img


def read_documents(path, stats, rng=None, max_images=6, min_sim=0.24, image_size=None, shard=(0, 1)):
    """Yield (where, items) for the good documents of one .jsonl file (lines with (line - 1) % shard[1] == shard[0]);
    items are str and PIL images. Bad lines go to `stats`."""
    rng = rng or random.Random(0)
    root = Path(path).parent
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if (lineno - 1) % shard[1] != shard[0] or not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                items = _layout(obj, rng, max_images, min_sim)
            except json.JSONDecodeError as e:
                stats.skip(where, f"invalid json: {e.msg}")
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                stats.skip(where, f"bad format: {e!r}")
                continue
            if not items:
                stats.skip(where, "empty document")
                continue
            try:
                items = [x if isinstance(x, str) else load_image(root / x, image_size) for x in items]
            except FileNotFoundError as e:
                stats.skip(where, f"missing image: {e.filename}")
                continue
            except Exception as e:  # PIL raises many kinds of errors for a broken file; none may stop training
                stats.skip(where, f"corrupt image: {e!r}")
                continue
            yield where, items


# ----------------------------------------------------------------------------------------------------------------------
# Tokenising and packing

def tokenize_document(items, tokenizer, boi_id, image_id, n_image_tokens):
    """Document items -> (ids, images): <s> text ... <BoI> <|image|> x n ... </s>, and the images in order."""
    ids, images = [tokenizer.bos_id], []
    for x in items:
        if isinstance(x, str):
            ids += tokenizer.encode(x, bos=False, eos=False)
        else:
            ids += [boi_id] + [image_id] * n_image_tokens
            images.append(x)
    return ids + [tokenizer.eos_id], images


def _row(toks, dids, imgs, seq_len, pad_id):
    first = dids[0] if dids else 0
    pad = seq_len - len(toks)
    return {"tokens": toks + [pad_id] * pad, "doc_ids": [d - first for d in dids] + [-1] * pad,
            "images": [im for _, im in imgs], "image_pos": [p for p, _ in imgs]}


def pack(docs, seq_len, pad_id, boi_id, n_image_tokens, stats=None):
    """Concatenate tokenised documents and cut them into rows of seq_len tokens.

    docs: iterable of (ids, images, where). Yields dicts with "tokens" and "doc_ids" (lists of seq_len ints),
    "images" (in order) and "image_pos" (each image's BoI position in the row). A cut that would fall inside an
    image (its BoI or placeholders) moves back to that image's BoI; the rest of the document starts the next row.
    A document longer than seq_len is skipped and recorded in stats. The last row is padded."""
    stats = stats if stats is not None else Stats()
    toks, dids, imgs = [], [], []  # the carried buffer; imgs = [(position in buffer, image)]
    doc = 0
    for ids, images, where in docs:
        if len(ids) > seq_len:
            stats.skip(where, f"longer than context: {len(ids)} > {seq_len} tokens")
            continue
        starts = [p for p, t in enumerate(ids) if t == boi_id]
        assert len(starts) == len(images), "one image per BoI token"
        imgs += [(len(toks) + p, im) for p, im in zip(starts, images)]
        toks, dids, doc = toks + ids, dids + [doc] * len(ids), doc + 1
        while len(toks) >= seq_len:
            cut = seq_len
            for p, _ in imgs:
                if p < cut < p + 1 + n_image_tokens:
                    cut = p
            assert cut > 0  # an image run is never longer than a document, so never longer than seq_len
            yield _row(toks[:cut], dids[:cut], [(p, im) for p, im in imgs if p < cut], seq_len, pad_id)
            toks, dids, imgs = toks[cut:], dids[cut:], [(p - cut, im) for p, im in imgs if p >= cut]
    if toks:
        yield _row(toks, dids, imgs, seq_len, pad_id)


def to_tensor(img):
    """PIL image -> FloatTensor [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float() / 255


def collate(rows):
    """Rows from the datasets below -> the batch format at the top of this file."""
    images = [im for r in rows for im in r["images"]]
    size = rows[0]["image_size"]
    return {
        "tokens": torch.tensor([r["tokens"] for r in rows], dtype=torch.long),
        "doc_ids": torch.tensor([r["doc_ids"] for r in rows], dtype=torch.long),
        "images": torch.stack(images) if images else torch.zeros(0, 3, size, size),
        "image_rows": torch.tensor([b for b, r in enumerate(rows) for _ in r["images"]], dtype=torch.long),
        "image_pos": torch.tensor([p for r in rows for p in r["image_pos"]], dtype=torch.long),
        "skipped": [s for r in rows for s in r.get("skipped", [])],
    }


class SyntheticDataset(Dataset):
    """Packed rows of the synthetic world. Row k is a pure function of (seed, split, k): documents drawn from
    random.Random(f"{seed}:{split}:{k}") fill the row; the document that crosses the end is cut (the packing rule)
    and its tail dropped. So resuming is exact: ask for the same rows. `batch(step, ...)` / `loader(...)` give
    training batches; with world_size ranks, step s uses rows [s*B*W, (s+1)*B*W), rank r the r-th B of them."""

    def __init__(self, tokenizer, boi_id, image_id, n_image_tokens, seq_len, seed=0, split="train",
                 image_size=IMAGE_SIZE, kinds=None):
        self.tok, self.boi_id, self.image_id, self.n = tokenizer, boi_id, image_id, n_image_tokens
        self.seq_len, self.seed, self.split, self.image_size = seq_len, seed, split, image_size
        self.kinds = kinds or KINDS

    def documents(self, k):
        rng = random.Random(f"{self.seed}:{self.split}:{k}")
        for i in range(1000):  # bounded: a seq_len too short for any document must not hang
            doc = synthetic_document(rng, rng.choices(list(self.kinds), list(self.kinds.values()))[0],
                                     self.split, self.image_size)
            yield *tokenize_document(doc, self.tok, self.boi_id, self.image_id, self.n), f"synthetic:{k}:{i}"

    def __getitem__(self, k):
        stats = Stats()
        row = next(pack(self.documents(k), self.seq_len, self.tok.pad_id, self.boi_id, self.n, stats), None)
        if row is None:
            raise ValueError(f"seq_len={self.seq_len} is too short for any synthetic document")
        row["images"] = [to_tensor(im) for im in row["images"]]
        return {**row, "image_size": self.image_size, "skipped": stats.skipped}

    def rows(self, step, batch_size, rank=0, world_size=1):
        start = (step * world_size + rank) * batch_size
        return range(start, start + batch_size)

    def batch(self, step, batch_size, rank=0, world_size=1):
        return collate([self[k] for k in self.rows(step, batch_size, rank, world_size)])

    def loader(self, batch_size, start_step=0, rank=0, world_size=1, num_workers=0):
        """An endless DataLoader of batches for steps start_step, start_step + 1, ..."""
        steps = _Rows(self, batch_size, start_step, rank, world_size)
        return torch.utils.data.DataLoader(self, batch_size=batch_size, sampler=steps, collate_fn=collate,
                                           num_workers=num_workers)


class _Rows:
    def __init__(self, ds, batch_size, start_step, rank, world_size):
        self.args = ds, batch_size, start_step, rank, world_size

    def __iter__(self):
        ds, b, start, rank, world = self.args
        return (k for step in count(start) for k in ds.rows(step, b, rank, world))


class CorpusDataset(IterableDataset):
    """Packed rows from .jsonl corpora, one pass (call set_epoch(e) between passes for new random placements).
    Lines are sharded over DDP ranks and DataLoader workers (line i goes to shard i % shards). Skipped documents
    ride along in each row's "skipped" list (the last row of a shard carries the tail), so they reach the main
    process even from workers; a shard that yields no row at all warns with its report instead. Ranks may get
    different numbers of rows: under DDP, end the epoch when any rank runs out (or use the synthetic stream)."""

    def __init__(self, paths, tokenizer, boi_id, image_id, n_image_tokens, seq_len, image_size=224, max_images=6,
                 min_sim=0.24, seed=0, rank=0, world_size=1):
        self.paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.tok, self.boi_id, self.image_id, self.n, self.seq_len = tokenizer, boi_id, image_id, n_image_tokens, seq_len
        self.image_size, self.max_images, self.min_sim = image_size, max_images, min_sim
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        shard = (self.rank * nw + wid, self.world_size * nw)
        rng = random.Random(f"{self.seed}:{self.epoch}:{shard[0]}")
        stats = Stats()
        docs = ((*tokenize_document(items, self.tok, self.boi_id, self.image_id, self.n), where)
                for path in self.paths
                for where, items in read_documents(path, stats, rng, self.max_images, self.min_sim,
                                                   self.image_size, shard))
        prev = None
        for row in pack(docs, self.seq_len, self.tok.pad_id, self.boi_id, self.n, stats):
            row.update(images=[to_tensor(im) for im in row["images"]], image_size=self.image_size)
            if prev is not None:  # hold each row back one step so the last one can carry the trailing records
                yield {**prev, "skipped": stats.take()}
            prev = row
        if prev is not None:
            yield {**prev, "skipped": stats.take()}
        elif stats.skipped:
            warnings.warn(stats.report())
