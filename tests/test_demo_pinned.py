"""The shipped checkpoint's demo, `python sample.py` with its defaults (seed 0, greedy text, DDIM 25, guidance 2), run
once for two checks:
- pinned: it prints exactly the stored text and draws exactly the stored pixels, and its contact sheet is the README's
  picture (assets/demo_sheet.png). A refactor must keep all three; a deliberate change of behaviour regenerates
  tests/fixtures/demo/ and the sheet (and says so in its commit);
- right: each prompt's answer is what the world's rules say, graded by the world's exact scorer (world.score)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import world

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "demo"
SHEET = ROOT / "assets" / "demo_sheet.png"
PROMPTS = ROOT / "assets" / "demo.txt"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """-> (the output folder, sample.py's result lines "[title] -> ...")"""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, [x for x in p.stdout.splitlines() if x.startswith("[")]


def test_shipped_demo_is_unchanged(demo):
    out, lines = demo
    assert lines == (FIXTURE / "text.txt").read_text().splitlines()
    expected = sorted(f.name for f in FIXTURE.glob("*_gen.png"))
    assert sorted(f.name for f in out.glob("*_gen.png")) == expected
    pairs = [(out / name, FIXTURE / name) for name in expected] + [(out / "sheet.png", SHEET)]
    for ours, stored in pairs:
        got, want = (np.asarray(Image.open(f).convert("RGB")) for f in (ours, stored))
        assert got.shape == want.shape and np.array_equal(got, want), f"{ours.name}: pixels differ from {stored}"


def what_is_asked(prompt):
    """A demo prompt read by the world's rules -> (the scene each <img> to draw must show, the example that grades
    the text the model writes at the end or None). Its pictures are read back with parse_image, its sentences with
    parse_caption / parse_change; a picture the model draws counts as the scene it should show."""
    scene, draws, question = None, [], None
    for piece in filter(None, (p.strip() for p in re.split(r"(<img(?::[^>]*)?>)", prompt))):
        if piece == "<img>":
            draws.append(scene)
        elif piece.startswith("<img:"):
            scene = world.parse_image(Image.open(PROMPTS.parent / piece[5:-1]))
        elif (m := re.fullmatch(r"question: (.*) answer:", piece)) is not None:
            question = m[1]
        else:
            scene = world.parse_caption(piece) or world.parse_change(piece, scene)
            assert scene is not None, f"the world's rules do not read {piece!r}"
    if prompt.rstrip().endswith("<img>"):
        return draws, None
    if question is not None:
        return draws, {"kind": "qa", "scene": scene, "answer": world.answer(question, scene)}
    return draws, {"kind": "i2t", "scene": scene}


# the prompts the shipped model still gets wrong, each an open target of the tiny recipe (experiments/README.md,
# "Stage 5 twice as long"); strict: a model that gets one right fails here until it is taken off the list
WRONG_TODAY = {5: "a story in two pictures: the second, after the model's own first, draws the blue triangle green"}


@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=WRONG_TODAY[i]))
                               if i in WRONG_TODAY else i for i in range(1, 6)])
def test_shipped_demo_is_right(demo, i):
    out, lines = demo
    prompts = [re.sub(r"^#.*\n", "", p.strip()) for p in PROMPTS.read_text().split("\n---\n")]
    assert len(prompts) == len(lines) == 5
    prompt, line = prompts[i - 1], lines[i - 1]
    draws, text_example = what_is_asked(prompt)
    pictures = sorted(out.glob(f"p{i}_*_gen.png"), key=lambda f: int(f.name.split("_")[1]))
    assert len(pictures) == len(draws), line
    right = [world.score({"kind": "t2i", "scene": s}, Image.open(f))["exact"] == 1 for s, f in zip(draws, pictures)]
    if text_example is not None:
        right.append(world.score(text_example, line.split("] -> ", 1)[1])["exact"] == 1)
    assert all(right), f"{line} (right: {right}; asked: {[world.caption(s) for s in draws]}, {text_example})"
