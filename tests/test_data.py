"""data.py: corpora reading with bad data, tokenising, packing, batches (the synthetic world: test_world.py)."""
import json
import random

import pytest
import torch
from PIL import Image

import data
import world
from tokenizer import mmi_tokenizer
from vit import to_tensor01

N_IMG = 4  # placeholder tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return mmi_tokenizer("byte", 259)  # bytes, <s>, </s>, <pad>, then BoI and <|image|>


# ---------------------------------------------------------------------------------------------- tokenising + packing

def doc_of(n_text, n_images, tok, where="d"):
    """A tokenised document: n_images images, then n_text bytes of text."""
    items = [Image.new("RGB", (8, 8))] * n_images + ["x" * n_text]
    return (*data.tokenize_document(items, tok, N_IMG), where)


def packed(docs, seq_len, tok, stats=None):
    return list(data.pack(docs, seq_len, tok, N_IMG, stats))


def test_tokenize_document(tok):
    img = Image.new("RGB", (8, 8))
    ids, images = data.tokenize_document(["ab", img, "c"], tok, N_IMG)
    assert ids == [tok.bos_id, 97, 98, tok.boi_id] + [tok.image_id] * N_IMG + [99, tok.eos_id]
    assert len(images) == 1 and torch.equal(images[0], to_tensor01(img))  # PIL images become [3,H,W] in [0,1]
    x = torch.rand(3, 8, 8)
    ids, images = data.tokenize_document([x, "c"], tok, N_IMG, bos=False, eos=False)  # as generation's prompt
    assert ids == [tok.boi_id] + [tok.image_id] * N_IMG + [99] and images[0] is x


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
    assert rows[1]["tokens"][:7] == b[0][1:] and rows[1]["tokens"][0] == tok.boi_id and len(rows[1]["images"]) == 1
    assert rows[1]["doc_ids"][:7] == [0] * 7  # the tail of b is document 0 of the next row
    for seq_len in range(9, 20):  # every cut position: images whole, nothing lost, nothing duplicated
        docs = [doc_of(i % 4, i % 3, tok, f"d{i}") for i in range(12)]
        rows = packed(docs, seq_len, tok)
        stream = [t for r in rows for t in r["tokens"] if t != tok.pad_id]
        assert stream == [t for d in docs if len(d[0]) <= seq_len for t in d[0]]
        for r in rows:
            boi = [p for p, t in enumerate(r["tokens"]) if t == tok.boi_id]
            assert len(r["tokens"]) == seq_len and len(r["images"]) == len(boi)
            for p in boi:
                assert r["tokens"][p + 1:p + 1 + N_IMG] == [tok.image_id] * N_IMG


def test_pack_skips_overlong_document(tok):
    stats = data.Stats()
    rows = packed([doc_of(3, 0, tok), doc_of(30, 2, tok, "long.jsonl:7"), doc_of(3, 0, tok)], 16, tok, stats)
    assert len(rows) == 1 and rows[0]["doc_ids"] == [0] * 5 + [1] * 5 + [-1] * 6
    assert stats.skipped == [("long.jsonl:7", "longer than context: 42 > 16 tokens")]
    assert "long.jsonl:7" in stats.report()


# ---------------------------------------------------------------------------------------------- batches

def test_synthetic_batches_deterministic_resumable(tok):
    ds = data.SyntheticDataset(tok, 16, 192, seed=1)
    b = ds.batch(3, 4)
    assert b["tokens"].shape == b["doc_ids"].shape == (4, 192) and b["tokens"].dtype == torch.long
    rows, pos = (b["tokens"] == tok.boi_id).nonzero(as_tuple=True)  # one image per BoI, in row-major order
    n = len(rows)
    assert n > 0 and b["images"].shape == (n, 3, 32, 32) and b["images"].dtype == torch.float32
    assert 0 <= b["images"].min() and b["images"].max() <= 1
    for row, p in zip(rows.tolist(), pos.tolist()):
        assert (b["tokens"][row, p + 1:p + 17] == tok.image_id).all()
    assert set(b) == {"tokens", "doc_ids", "images", "skipped"}  # what the model and train.py read
    loader = iter(ds.loader(4, start_step=3))  # resume at step 3 == batch(3)
    for step in (3, 4):
        c = next(loader)
        ref = ds.batch(step, 4)
        assert all(torch.equal(c[k], ref[k]) for k in ("tokens", "doc_ids", "images"))
    halves = [ds.batch(3, 2, rank=r, world_size=2) for r in (0, 1)]  # DDP ranks split the same global batch
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), b["tokens"])
    other = data.SyntheticDataset(tok, 16, 192, seed=2).batch(3, 4)
    assert not torch.equal(other["tokens"], b["tokens"])


def test_synthetic_story_min_shapes_reaches_the_rows(tok):
    """train.py --story_min_shapes -> SyntheticDataset: stories start from at least that many objects."""
    def objects_per_picture(**kw):
        images = data.SyntheticDataset(tok, 16, 512, kinds={"story": 1.0}, **kw).batch(0, 4)["images"]
        pictures = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
        return [sum(obj is not None for obj in world.parse_image(p)) for p in pictures]

    assert min(objects_per_picture()) == 1  # the world's own mix: 1 to 4 objects
    assert min(objects_per_picture(story_min_shapes=4)) >= 2  # 4, then at most two edits that each remove one


@pytest.fixture()
def corpus(tmp_path):
    world.render(world.make_scene({"centre": ("red", "circle")})).save(tmp_path / "ok.png")
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
    ds = data.CorpusDataset(corpus, tok, N_IMG, seq_len=64, image_size=16)
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
    ds = data.CorpusDataset(corpus, tok, N_IMG, seq_len=64, image_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate, num_workers=2)
    stats = data.Stats()
    batches = list(loader)
    for b in batches:
        stats.add(b["skipped"])
    assert len(stats.skipped) == 7 and sum(len(b["images"]) for b in batches) == 3


def test_corpus_shard_with_nothing_usable_sends_its_records(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"items": [ broken\n{"foo": 1}\n')
    ds = data.CorpusDataset(tmp_path / "bad.jsonl", tok, N_IMG, seq_len=64, image_size=16)
    rows = list(ds)
    assert len(rows) == 1 and "tokens" not in rows[0] and len(rows[0]["skipped"]) == 2
    assert data.collate(rows) == {"skipped": rows[0]["skipped"]}
    (tmp_path / "empty.jsonl").write_text("")
    assert list(data.CorpusDataset(tmp_path / "empty.jsonl", tok, N_IMG, seq_len=64)) == [{"skipped": []}]


def test_stats_counts_per_epoch_and_in_all():
    stats = data.Stats()
    stats.add([("a.jsonl:1", "invalid json: x"), ("a.jsonl:2", "missing image: b.png")])
    assert stats.report().startswith("skipped 2 documents (invalid json: 1, missing image: 1); 2 in all\n  a.jsonl:1")
    stats.end_epoch()
    assert stats.report() == "skipped 0 documents; 2 in all"
    stats.skip("a.jsonl:1", "invalid json: x")
    restored = data.Stats()
    restored.merge(stats.state())  # what a checkpoint keeps
    assert restored.epoch == {"invalid json": 1} and restored.total == {"invalid json": 2, "missing image": 1}
    assert data.Stats.summary(restored.total) == "3 documents (invalid json: 2, missing image: 1)"
