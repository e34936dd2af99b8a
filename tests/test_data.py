"""data.py: synthetic world, scorers, corpora reading with bad data, tokenising, packing, batches."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import data

try:
    from tokenizer import ByteTokenizer
except ImportError:  # stand-in with the same interface, until tokenizer.py lands
    class ByteTokenizer:
        bos_id, eos_id, pad_id = 256, 257, 258

        def __init__(self):
            self.n = 259

        def encode(self, text, bos=True, eos=False):
            return [256] * bos + list(text.encode()) + [257] * eos

        def add_special_tokens(self, names):
            self.n += len(names)
            return list(range(self.n - len(names), self.n))


N_IMG = 4  # placeholder tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    t = ByteTokenizer()
    t.boi_id, t.image_id = t.add_special_tokens(["<|beginofimage|>", "<|image|>"])
    return t


def scenes(n, seed=0, split="train"):
    rng = random.Random(seed)
    return [data.random_scene(rng, split) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- the synthetic world

def test_caption_round_trip_and_rejects():
    for s in scenes(300) + scenes(100, split="eval"):
        assert data.parse_caption(data.caption(s)) == s
    s = data.make_scene({"top left": ("red", "circle"), "centre": ("blue", "square")})
    assert data.caption(s) == "a red circle in the top left and a blue square in the centre."
    for bad in ["a blue square in the centre and a red circle in the top left.",  # not canonical order
                "a red circle in the top left and a blue square in the centre",  # no full stop
                "a pink circle in the top left.", "a red circle in the top left, a red circle in the top left.", ""]:
        assert data.parse_caption(bad) is None


def test_render_parse_round_trip():
    for s in scenes(200, seed=1):
        assert data.parse_image(data.render(s)) == s
        assert data.parse_image(data.to_tensor(data.render(s))) == s  # a [3,H,W] tensor too


def test_parse_image_tolerates_generation_noise():
    nrng = np.random.default_rng(0)
    for i, s in enumerate(scenes(150, seed=2)):
        img = data.render(s).filter(ImageFilter.GaussianBlur(0.8)) if i % 2 else data.render(s)
        x = np.asarray(img, np.float32) / 255
        x = np.roll(x, (i % 3 - 1, (i // 3) % 3 - 1), (0, 1))  # off by a pixel
        x = np.clip(x * nrng.uniform(0.8, 1.1) + nrng.normal(0, 0.12, x.shape), 0, 1)
        assert data.parse_image(x) == s


def test_determinism_and_held_out_split():
    a = [data.synthetic_document(random.Random(5), k) for k in data.KINDS]
    b = [data.synthetic_document(random.Random(5), k) for k in data.KINDS]
    assert [[x if isinstance(x, str) else x.tobytes() for x in d] for d in a] == \
           [[x if isinstance(x, str) else x.tobytes() for x in d] for d in b]
    train, held = set(scenes(2000, seed=3)), set(scenes(300, seed=3, split="eval"))
    assert not train & held and all(data.split_of(s) == "eval" for s in held)
    frac = sum(data.split_of(s) == "eval" for s in scenes(2000, seed=4, split="train")) / 2000
    assert frac == 0
    # every image of every training document is a training scene; eval examples only show held-out scenes
    rng = random.Random(6)
    for _ in range(40):
        for x in data.synthetic_document(rng, "story"):
            if not isinstance(x, str):
                assert data.split_of(data.parse_image(x)) == "train"
    for kind in ("i2t", "t2i", "qa", "story"):
        for ex in data.eval_examples(kind, 10):
            assert data.split_of(ex["scene"]) == "eval"
            for x in ex["prompt"]:
                if not isinstance(x, str):
                    assert data.split_of(data.parse_image(x)) == "eval"


def test_story_sentences_parse_to_the_next_image():
    rng = random.Random(7)
    for _ in range(30):
        doc = data.synthetic_document(rng, "story")
        assert len(doc) in (3, 5)
        for i in range(1, len(doc), 2):
            before, after = data.parse_image(doc[i - 1]), data.parse_image(doc[i + 1])
            assert data.parse_change(doc[i], before) == after


def test_scoring():
    ex = data.eval_examples("i2t", 1)[0]
    assert data.score(ex, ex["answer"])["exact"] == 1 and data.score(ex, "a red circle.")["exact"] == 0
    ex = data.eval_examples("qa", 1)[0]
    assert data.score(ex, " " + ex["answer"] + " question: ...")["exact"] == 1
    assert data.score(ex, " purple.")["exact"] == 0
    ex = data.eval_examples("t2i", 1)[0]
    assert data.score(ex, data.render(ex["scene"])) == {"exact": 1.0, "cell_acc": 1.0, "object_acc": 1.0}
    k = sum(c is not None for c in ex["scene"])
    blank = data.score(ex, Image.new("RGB", (32, 32)))
    assert blank["cell_acc"] == pytest.approx((9 - k) / 9) and blank["object_acc"] == 0
    ex = data.eval_examples("story", 1)[0]
    assert isinstance(ex["prompt"][-1], str) and data.score(ex, data.render(ex["scene"]))["exact"] == 1


# ---------------------------------------------------------------------------------------------- tokenising + packing

def doc_of(n_text, n_images, tok, where="d"):
    """A tokenised document: n_images images, then n_text bytes of text."""
    items = [Image.new("RGB", (8, 8))] * n_images + ["x" * n_text]
    return (*data.tokenize_document(items, tok, tok.boi_id, tok.image_id, N_IMG), where)


def packed(docs, seq_len, tok, stats=None):
    return list(data.pack(docs, seq_len, tok.pad_id, tok.boi_id, N_IMG, stats))


def test_tokenize_document(tok):
    img = Image.new("RGB", (8, 8))
    ids, images = data.tokenize_document(["ab", img, "c"], tok, tok.boi_id, tok.image_id, N_IMG)
    assert ids == [tok.bos_id, 97, 98, tok.boi_id] + [tok.image_id] * N_IMG + [99, tok.eos_id]
    assert images == [img]


def test_pack_exact_fit_and_padding(tok):
    a, b = doc_of(6, 0, tok), doc_of(2, 0, tok)  # 8 and 4 tokens
    rows = packed([a, b], 12, tok)
    assert len(rows) == 1 and rows[0]["tokens"] == a[0] + b[0] and rows[0]["doc_ids"] == [0] * 8 + [1] * 4
    rows = packed([a], 12, tok)
    assert rows[0]["tokens"] == a[0] + [tok.pad_id] * 4 and rows[0]["doc_ids"] == [0] * 8 + [-1] * 4


def test_pack_never_splits_an_image(tok):
    a = doc_of(5, 0, tok)  # 7 tokens
    b = doc_of(1, 1, tok)  # <s> BoI img*4 x </s> = 8 tokens; with seq_len 10, the cut falls inside b's image
    rows = packed([a, b], 10, tok)
    assert rows[0]["tokens"] == a[0] + [tok.bos_id] + [tok.pad_id] * 2  # cut moved back to b's BoI
    assert rows[0]["images"] == [] and rows[0]["doc_ids"] == [0] * 7 + [1, -1, -1]
    assert rows[1]["tokens"][:7] == b[0][1:] and rows[1]["image_pos"] == [0] and len(rows[1]["images"]) == 1
    assert rows[1]["doc_ids"][:7] == [0] * 7  # the tail of b is document 0 of the next row
    for seq_len in range(9, 20):  # every cut position: images whole, nothing lost, nothing duplicated
        docs = [doc_of(i % 4, i % 3, tok, f"d{i}") for i in range(12)]
        rows = packed(docs, seq_len, tok)
        stream = [t for r in rows for t in r["tokens"] if t != tok.pad_id]
        assert stream == [t for d in docs if len(d[0]) <= seq_len for t in d[0]]
        for r in rows:
            assert len(r["tokens"]) == seq_len and len(r["images"]) == len(r["image_pos"])
            assert [p for p, t in enumerate(r["tokens"]) if t == tok.boi_id] == r["image_pos"]
            for p in r["image_pos"]:
                assert r["tokens"][p + 1:p + 1 + N_IMG] == [tok.image_id] * N_IMG


def test_pack_skips_overlong_document(tok):
    stats = data.Stats()
    rows = packed([doc_of(3, 0, tok), doc_of(30, 2, tok, "long.jsonl:7"), doc_of(3, 0, tok)], 16, tok, stats)
    assert len(rows) == 1 and rows[0]["doc_ids"] == [0] * 5 + [1] * 5 + [-1] * 6
    assert stats.skipped == [("long.jsonl:7", "longer than context: 42 > 16 tokens")]
    assert "long.jsonl:7" in stats.report()


# ---------------------------------------------------------------------------------------------- batches

def test_synthetic_batches_deterministic_resumable(tok):
    ds = data.SyntheticDataset(tok, tok.boi_id, tok.image_id, 16, 192, seed=1)
    b = ds.batch(3, 4)
    assert b["tokens"].shape == b["doc_ids"].shape == (4, 192) and b["tokens"].dtype == torch.long
    n = len(b["image_rows"])
    assert n > 0 and b["images"].shape == (n, 3, 32, 32) and b["images"].dtype == torch.float32
    assert 0 <= b["images"].min() and b["images"].max() <= 1
    for row, pos in zip(b["image_rows"].tolist(), b["image_pos"].tolist()):
        assert b["tokens"][row, pos] == tok.boi_id and (b["tokens"][row, pos + 1:pos + 17] == tok.image_id).all()
    assert (b["image_rows"].diff() >= 0).all()
    loader = iter(ds.loader(4, start_step=3))  # resume at step 3 == batch(3)
    for step in (3, 4):
        c = next(loader)
        ref = ds.batch(step, 4)
        assert all(torch.equal(c[k], ref[k]) for k in ("tokens", "doc_ids", "images", "image_rows", "image_pos"))
    halves = [ds.batch(3, 2, rank=r, world_size=2) for r in (0, 1)]  # DDP ranks split the same global batch
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), b["tokens"])
    other = data.SyntheticDataset(tok, tok.boi_id, tok.image_id, 16, 192, seed=2).batch(3, 4)
    assert not torch.equal(other["tokens"], b["tokens"])


@pytest.fixture()
def corpus(tmp_path):
    data.render(data.make_scene({"centre": ("red", "circle")})).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    lines = [
        json.dumps({"items": [{"text": "hello"}, {"image": "ok.png"}, {"text": "world"}]}),  # 1 ok
        json.dumps({"image": "ok.png", "caption": "A Red Circle"}),  # 2 ok (pair)
        '{"items": [ broken',  # 3 invalid json
        json.dumps({"items": [{"text": "x"}, {"image": "missing.png"}]}),  # 4 missing image
        json.dumps({"image": "bad.png", "caption": "corrupt"}),  # 5 corrupt image
        json.dumps({"items": []}),  # 6 empty
        json.dumps({"text_list": ["a " * 200], "image_info": []}),  # 7 longer than the context
        json.dumps({"text_list": ["one.", "two."],  # 8 ok (MMC4), low-similarity image dropped
                    "image_info": [{"image_name": "ok.png", "matched_text_index": 1, "matched_sim": 0.3},
                                   {"image_name": "ok.png", "matched_text_index": 0, "matched_sim": 0.1}]}),
        json.dumps({"text_list": ["   "]}),  # 9 empty (blank text only)
        json.dumps({"foo": 1}),  # 10 bad format
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_corpus_bad_data_is_skipped_counted_reported(corpus, tok):
    ds = data.CorpusDataset(corpus, tok, tok.boi_id, tok.image_id, N_IMG, seq_len=64, image_size=16)
    rows = list(ds)
    stats = data.Stats()
    for r in rows:
        stats.add(r["skipped"])
    got = {w.rsplit(":", 1)[1]: reason.split(":")[0] for w, reason in stats.skipped}
    assert got == {"3": "invalid json", "4": "missing image", "5": "corrupt image", "6": "empty document",
                   "7": "longer than context", "9": "empty document", "10": "bad format"}
    report = stats.report()
    assert report.startswith("skipped 7 documents") and f"{corpus}:4: missing image" in report
    text = bytes(t for r in rows for t in r["tokens"] if t < 256).decode()
    assert "hello" in text and "a red circle" in text and "one.two." in text
    assert sum(len(r["images"]) for r in rows) == 3  # doc 1, the pair, MMC4 (one image kept)
    b = data.collate(rows)
    assert b["images"].shape == (3, 3, 16, 16) and b["tokens"].shape == (len(rows), 64)


def test_corpus_placement_rules(corpus, tok):
    pairs, mmc4 = set(), set()
    for seed in range(12):
        docs = dict(data.read_documents(corpus, data.Stats(), random.Random(seed)))
        pairs.add(tuple(isinstance(x, str) for x in docs[f"{corpus}:2"]))
        mmc4.add(tuple(x if isinstance(x, str) else "IMG" for x in docs[f"{corpus}:8"]))
        assert "a red circle" in docs[f"{corpus}:2"]  # lowercased
    assert pairs == {(True, False), (False, True)}  # caption first or image first
    assert mmc4 == {("one.", "IMG", "two."), ("one.", "two.", "IMG")}  # before or after its sentence
    docs = dict(data.read_documents(corpus, data.Stats(), max_images=0))
    assert all(isinstance(x, str) for x in docs[f"{corpus}:1"])


def test_corpus_with_workers_reports_everything(corpus, tok):
    ds = data.CorpusDataset(corpus, tok, tok.boi_id, tok.image_id, N_IMG, seq_len=64, image_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate, num_workers=2)
    stats = data.Stats()
    batches = list(loader)
    for b in batches:
        stats.add(b["skipped"])
    assert len(stats.skipped) == 7 and sum(len(b["image_rows"]) for b in batches) == 3
