"""world.py: the synthetic world (captions, rendering and parsing, held-out split, stories) and its scorer."""
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

import world
from vit import to_tensor01


def scenes(n, seed=0, split="train"):
    rng = random.Random(seed)
    return [world.random_scene(rng, split) for _ in range(n)]


def test_caption_round_trip_and_rejects():
    for s in scenes(300) + scenes(100, split="eval"):
        assert world.parse_caption(world.caption(s)) == s
    s = world.make_scene({"top left": ("red", "circle"), "centre": ("blue", "square")})
    assert world.caption(s) == "a red circle in the top left and a blue square in the centre."
    for bad in ["a blue square in the centre and a red circle in the top left.",  # not canonical order
                "a red circle in the top left and a blue square in the centre",  # no full stop
                "a pink circle in the top left.", "a red circle in the top left, a red circle in the top left.", ""]:
        assert world.parse_caption(bad) is None


def test_render_parse_round_trip():
    for s in scenes(200, seed=1):
        assert world.parse_image(world.render(s)) == s
        assert world.parse_image(to_tensor01(world.render(s))) == s  # a [3,H,W] tensor too


def test_parse_image_tolerates_generation_noise():
    nrng = np.random.default_rng(0)
    for i, s in enumerate(scenes(150, seed=2)):
        img = world.render(s).filter(ImageFilter.GaussianBlur(0.8)) if i % 2 else world.render(s)
        x = np.asarray(img, np.float32) / 255
        x = np.roll(x, (i % 3 - 1, (i // 3) % 3 - 1), (0, 1))  # off by a pixel
        x = np.clip(x * nrng.uniform(0.8, 1.1) + nrng.normal(0, 0.12, x.shape), 0, 1)
        assert world.parse_image(x) == s


def test_determinism_and_held_out_split():
    a = [world.synthetic_document(random.Random(5), k) for k in world.KINDS]
    b = [world.synthetic_document(random.Random(5), k) for k in world.KINDS]
    assert [[x if isinstance(x, str) else x.tobytes() for x in d] for d in a] == \
           [[x if isinstance(x, str) else x.tobytes() for x in d] for d in b]
    train, held = set(scenes(2000, seed=3)), set(scenes(300, seed=3, split="eval"))
    assert not train & held and all(world.split_of(s) == "eval" for s in held)
    frac = sum(world.split_of(s) == "eval" for s in scenes(2000, seed=4, split="train")) / 2000
    assert frac == 0
    # every image of every training document is a training scene; eval examples only show held-out scenes
    rng = random.Random(6)
    for _ in range(40):
        for x in world.synthetic_document(rng, "story"):
            if not isinstance(x, str):
                assert world.split_of(world.parse_image(x)) == "train"
    for kind in ("i2t", "t2i", "qa", "story"):
        for ex in world.eval_examples(kind, 10):
            assert world.split_of(ex["scene"]) == "eval"
            for x in ex["prompt"]:
                if not isinstance(x, str):
                    assert world.split_of(world.parse_image(x)) == "eval"


def test_story_sentences_parse_to_the_next_image():
    rng = random.Random(7)
    for _ in range(30):
        doc = world.synthetic_document(rng, "story")
        assert len(doc) in (3, 5)
        for i in range(1, len(doc), 2):
            before, after = world.parse_image(doc[i - 1]), world.parse_image(doc[i + 1])
            assert world.parse_change(doc[i], before) == after


def test_story_min_shapes_sets_a_storys_first_scene_only():
    def first_scenes(kind, **kw):
        rng = random.Random(8)
        return [world.parse_image(next(x for x in world.synthetic_document(rng, kind, **kw) if not isinstance(x, str)))
                for _ in range(60)]

    def objects(scene):
        return sum(obj is not None for obj in scene)

    assert first_scenes("story") == first_scenes("story", story_min_shapes=1)  # the default draws the same documents
    assert min(map(objects, first_scenes("story"))) == 1
    assert min(map(objects, first_scenes("story", story_min_shapes=3))) == 3
    assert min(map(objects, first_scenes("qa", story_min_shapes=4))) == 1  # other kinds keep the world's own mix


def test_scoring():
    ex = world.eval_examples("i2t", 1)[0]
    assert world.score(ex, ex["answer"])["exact"] == 1 and world.score(ex, "a red circle.")["exact"] == 0
    ex = world.eval_examples("qa", 1)[0]
    assert world.score(ex, " " + ex["answer"] + " question: ...")["exact"] == 1
    assert world.score(ex, " purple.")["exact"] == 0
    ex = world.eval_examples("t2i", 1)[0]
    assert world.score(ex, world.render(ex["scene"])) == {"exact": 1.0, "cell_acc": 1.0, "object_acc": 1.0}
    k = sum(c is not None for c in ex["scene"])
    blank = world.score(ex, Image.new("RGB", (32, 32)))
    assert blank["cell_acc"] == pytest.approx((9 - k) / 9) and blank["object_acc"] == 0
    ex = world.eval_examples("story", 1)[0]
    assert isinstance(ex["prompt"][-1], str) and world.score(ex, world.render(ex["scene"]))["exact"] == 1


def test_answer_inverts_qa_pair():
    rng = random.Random(0)
    for scene in scenes(200):
        q, a = world.qa_pair(rng, scene)
        assert world.answer(q, scene) == a
    scene = world.make_scene({"centre": ("red", "circle"), "top left": ("white", "triangle")})
    assert [world.answer(q, scene) for q in ("what colour is in the centre?", "what shape is in the top left?",
            "what colour is in the bottom right?", "where is the white shape?", "how many shapes are there?")] == \
        ["red.", "a triangle.", "nothing.", "in the top left.", "two."]  # written out, not computed
    assert world.answer("where is the blue shape?", scene) is None  # no blue shape to point at
    assert world.answer("what colour is in the middle?", scene) is None and world.answer("hello?", scene) is None


def test_object_words_finds_each_object_phrase():
    from tokenizer import mmi_tokenizer
    tok = mmi_tokenizer("world", 440)
    scene = world.make_scene({"top left": ("red", "circle"), "centre": ("blue", "square"),
                              "bottom right": ("green", "triangle")})
    ids = tok.encode(world.caption(scene), bos=False)
    starts, ends = world.object_words(tok, ids)
    pieces = [tok.id_to_piece(t).lstrip("\u2581") for t in ids]
    assert [pieces[j] for j in starts] == ["a"] * 3 and [pieces[j] for j in ends] == ["left", "centre", "right"]
    with pytest.raises(ValueError, match="object phrases"):
        world.object_words(tok, tok.encode("the red circle moves.", bos=False))
