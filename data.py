"""Data for mmi: real interleaved corpora (.jsonl) with bad-data accounting, the one token format, packing, batches.
The synthetic world (scenes, captions, questions, stories, the scorer) is world.py; SyntheticDataset packs it.

A document is a list of items, each a `str` (text), a `PIL.Image.Image` or a FloatTensor [3, H, W] in [0, 1].
`tokenize_document` turns it into the model's sequence (the images become [3, H, W] tensors in [0, 1]):
    <s> text ... <BoI> <|image|> x n_image_tokens ... text </s>
Documents are concatenated and cut into rows of `seq_len` tokens; a cut never splits an image (it moves back to the
image's BoI and the rest starts the next row); rows are right-padded with pad_id. A document longer than seq_len is
skipped and counted (it could never be seen whole).

Batch format (what `collate` returns; B rows of T = seq_len tokens holding N images in all):
    tokens      LongTensor  [B, T]        token ids, pad_id after the last document of a row
    doc_ids     LongTensor  [B, T]        document index within the row (0, 1, ...); -1 on padding. A row may start
                                          with the tail of a document cut from the previous row (it has no <s>).
    images      FloatTensor [N, 3, H, W]  RGB in [0, 1], in the order of their BoI tokens (row by row)
    skipped     list[(where, reason)]     bad data met while producing these rows ("file.jsonl:12", "missing image");
                                          train.py counts it in a `Stats` and reports it at the end of each epoch.
"""
import json
import random
from collections import Counter, defaultdict
from itertools import count
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

import world
from vit import to_tensor01

# ----------------------------------------------------------------------------------------------------------------------
# Real corpora: JSON lines, one document per line, image paths relative to the .jsonl file. Three layouts:
#   simple: {"items": [{"text": "..."}, {"image": "a.jpg"}, ...]}                       (kept in order)
#   MMC4:   {"text_list": [...], "image_info": [{"image_name": "a.jpg", "matched_text_index": 0, "matched_sim": 0.3}]}
#           (images with matched_sim < min_sim dropped; each placed before or after its sentence at random)
#   pair:   {"image": "a.jpg", "caption": "..."}          (caption lowercased; image first or caption first at random)
MAX_IMAGES = 6  # at most this many images per document (the first ones; official: a random 6)
# At most max_images images per document (the first ones). Bad lines are skipped and counted, never raised.

class Stats:
    """Bad data met on the way: this epoch's skipped documents as (where, reason) records, e.g. ("docs.jsonl:12",
    "missing image: a.jpg"), and their counts by kind (the reason up to ":") for this epoch and for the whole run."""

    def __init__(self):
        self.skipped, self.epoch, self.total = [], Counter(), Counter()

    def skip(self, where, reason):
        self.add([(where, reason)])

    def add(self, records):
        records = [tuple(r) for r in records]
        kinds = Counter(reason.split(":")[0] for _, reason in records)
        self.skipped += records
        self.epoch.update(kinds)
        self.total.update(kinds)

    def take(self):
        """This epoch's records, forgotten here (a dataset passes them on inside its rows); the counts stay."""
        out, self.skipped = self.skipped, []
        return out

    def end_epoch(self):
        self.skipped, self.epoch = [], Counter()

    def state(self):  # the counts as plain dicts: what a checkpoint keeps, what DDP ranks gather
        return {"epoch": dict(self.epoch), "total": dict(self.total)}

    def merge(self, state):
        """Add the counts of another Stats' state() (a checkpoint's, another rank's)."""
        self.epoch.update(state["epoch"])
        self.total.update(state["total"])

    @staticmethod
    def summary(counts):
        """Counter of kinds -> '3 documents (invalid json: 2, missing image: 1)'."""
        n = sum(counts.values())
        return f"{n} documents" + (" (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")" if n else "")

    def report(self, max_lines=50):
        """'skipped 3 documents (invalid json: 2, missing image: 1); 7 in all' (this epoch; the run), then up to
        max_lines of this epoch's records."""
        lines = [f"skipped {self.summary(self.epoch)}; {sum(self.total.values())} in all"]
        lines += [f"  {w}: {r}" for w, r in self.skipped[:max_lines]]
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


def read_documents(path, stats, rng=None, max_images=MAX_IMAGES, min_sim=0.24, image_size=None, shard=(0, 1)):
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

def tokenize_document(items, tok, n_image_tokens, bos=True, eos=True):
    """Document items (str / PIL image / [3, H, W] tensor in [0, 1]) -> (ids, images): <s> text ... <BoI> <|image|> x
    n_image_tokens ... </s>, and the images in order as [3, H, W] tensors in [0, 1]. tok: the model's tokenizer
    (model.tok: tokenizer.mmi_tokenizer, with boi_id and image_id)."""
    ids, images = [tok.bos_id] if bos else [], []
    for x in items:
        if isinstance(x, str):
            ids += tok.encode(x, bos=False, eos=False)
        else:
            ids += [tok.boi_id] + [tok.image_id] * n_image_tokens
            images.append(x if torch.is_tensor(x) else to_tensor01(x))
    return ids + ([tok.eos_id] if eos else []), images


def _row(toks, dids, imgs, seq_len, pad_id):
    first = dids[0] if dids else 0
    pad = seq_len - len(toks)
    return {"tokens": toks + [pad_id] * pad, "doc_ids": [d - first for d in dids] + [-1] * pad,
            "images": [im for _, im in imgs]}


def pack(docs, seq_len, tok, n_image_tokens, stats=None):
    """Concatenate tokenised documents and cut them into rows of seq_len tokens.

    docs: iterable of (ids, images, where). Yields dicts with "tokens" and "doc_ids" (lists of seq_len ints) and
    "images" (in order). A cut that would fall inside an image (its BoI or placeholders) moves back to that image's
    BoI; the rest of the document starts the next row. A document longer than seq_len is skipped and recorded in
    stats. The last row is padded."""
    stats = stats if stats is not None else Stats()
    toks, dids, imgs = [], [], []  # the carried buffer; imgs = [(position in buffer, image)]
    doc = 0
    for ids, images, where in docs:
        if len(ids) > seq_len:
            stats.skip(where, f"longer than context: {len(ids)} > {seq_len} tokens")
            continue
        starts = [p for p, t in enumerate(ids) if t == tok.boi_id]
        assert len(starts) == len(images), "one image per BoI token"
        imgs += [(len(toks) + p, im) for p, im in zip(starts, images)]
        toks, dids, doc = toks + ids, dids + [doc] * len(ids), doc + 1
        while len(toks) >= seq_len:
            cut = seq_len
            for p, _ in imgs:
                if p < cut < p + 1 + n_image_tokens:
                    cut = p
            assert cut > 0  # an image run is never longer than a document, so never longer than seq_len
            yield _row(toks[:cut], dids[:cut], [(p, im) for p, im in imgs if p < cut], seq_len, tok.pad_id)
            toks, dids, imgs = toks[cut:], dids[cut:], [(p - cut, im) for p, im in imgs if p >= cut]
    if toks:
        yield _row(toks, dids, imgs, seq_len, tok.pad_id)


def collate(rows):
    """Rows from the datasets below -> the batch format at the top of this file. A row without "tokens" (a corpus
    shard with no usable document) brings only its skipped records; a batch of only such rows has only "skipped"."""
    skipped = [s for r in rows for s in r["skipped"]]
    rows = [r for r in rows if "tokens" in r]
    if not rows:
        return {"skipped": skipped}
    images = [im for r in rows for im in r["images"]]
    size = rows[0]["image_size"]
    return {"tokens": torch.tensor([r["tokens"] for r in rows], dtype=torch.long),
            "doc_ids": torch.tensor([r["doc_ids"] for r in rows], dtype=torch.long),
            "images": torch.stack(images) if images else torch.zeros(0, 3, size, size), "skipped": skipped}


class SyntheticDataset(Dataset):
    """Packed rows of the synthetic world (world.py). Row k is a pure function of (seed, split, k): documents drawn
    from random.Random(f"{seed}:{split}:{k}") fill the row; the document that crosses the end is cut (the packing
    rule) and its tail dropped. So resuming is exact: ask for the same rows. `batch(step, ...)` / `loader(...)` give
    training batches; with world_size ranks, step s uses rows [s*B*W, (s+1)*B*W), rank r the r-th B of them."""

    def __init__(self, tok, n_image_tokens, seq_len, seed=0, split="train", image_size=world.IMAGE_SIZE, kinds=None,
                 story_min_shapes=1):
        self.tok, self.n, self.seq_len, self.seed, self.split = tok, n_image_tokens, seq_len, seed, split
        self.image_size, self.kinds, self.story_min_shapes = image_size, kinds or world.KINDS, story_min_shapes

    def documents(self, k):
        rng = random.Random(f"{self.seed}:{self.split}:{k}")
        for i in range(1000):  # bounded: a seq_len too short for any document must not hang
            doc = world.synthetic_document(rng, rng.choices(list(self.kinds), list(self.kinds.values()))[0],
                                           self.split, self.image_size, self.story_min_shapes)
            yield *tokenize_document(doc, self.tok, self.n), f"synthetic:{k}:{i}"

    def __getitem__(self, k):
        stats = Stats()
        row = next(pack(self.documents(k), self.seq_len, self.tok, self.n, stats), None)
        if row is None:
            raise ValueError(f"seq_len={self.seq_len} is too short for any synthetic document")
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
        ds, b, start, rank, world_size = self.args
        return (k for step in count(start) for k in ds.rows(step, b, rank, world_size))


class CorpusDataset(IterableDataset):
    """Packed rows from .jsonl corpora, one pass (call set_epoch(e) between passes for new random placements).
    Lines are sharded over DDP ranks and DataLoader workers (line i goes to shard i % shards). Skipped documents
    ride along in each row's "skipped" list (the last row of a shard carries the tail), so they reach the main
    process even from workers; a shard with no usable document yields one row of its records alone (no "tokens").
    Ranks may get different numbers of rows: under DDP, end the epoch when any rank runs out."""

    def __init__(self, paths, tok, n_image_tokens, seq_len, image_size=224, max_images=MAX_IMAGES, min_sim=0.24,
                 seed=0, rank=0, world_size=1):
        self.paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.tok, self.n, self.seq_len = tok, n_image_tokens, seq_len
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
        docs = ((*tokenize_document(items, self.tok, self.n), where)
                for path in self.paths
                for where, items in read_documents(path, stats, rng, self.max_images, self.min_sim,
                                                   self.image_size, shard))
        prev = None
        for row in pack(docs, self.seq_len, self.tok, self.n, stats):
            if prev is not None:  # hold each row back one step so the last one can carry the trailing records
                yield {**prev, "skipped": stats.take()}
            prev = {**row, "image_size": self.image_size}
        yield {**prev, "skipped": stats.take()} if prev is not None else {"skipped": stats.take()}
