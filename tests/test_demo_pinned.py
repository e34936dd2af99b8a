"""The shipped checkpoint's demo is pinned: `python sample.py` with its defaults (seed 0, greedy text, DDIM 25,
guidance 2) prints exactly the stored text and draws exactly the stored pixels, and its contact sheet is the README's
picture (assets/demo_sheet.png). A refactor must keep all three; a deliberate change of behaviour regenerates
tests/fixtures/demo/ and the sheet (and says so in its commit)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "demo"
SHEET = ROOT / "assets" / "demo_sheet.png"


def test_shipped_demo_is_unchanged(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tmp_path}"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("[")]
    assert lines == (FIXTURE / "text.txt").read_text().splitlines()
    expected = sorted(f.name for f in FIXTURE.glob("*_gen.png"))
    assert sorted(f.name for f in tmp_path.glob("*_gen.png")) == expected
    pairs = [(tmp_path / name, FIXTURE / name) for name in expected] + [(tmp_path / "sheet.png", SHEET)]
    for ours, stored in pairs:
        got, want = (np.asarray(Image.open(f).convert("RGB")) for f in (ours, stored))
        assert got.shape == want.shape and np.array_equal(got, want), f"{ours.name}: pixels differ from {stored}"
