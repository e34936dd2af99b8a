"""sample.py end to end on a random tiny model (the HTML page references every image written) and its clear
one-line errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_random_model_end_to_end(tmp_path):
    out = tmp_path / "s"
    p = run(["--ckpt=random", "--steps=2", "--max_new_tokens=6", f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    page = (out / "index.html").read_text()
    written = sorted(f.name for f in out.glob("*.png"))
    referenced = sorted(re.findall(r'<img [^>]*src="([^"]+)"', page))
    assert written and written == referenced
    assert sum(name.endswith("_gen.png") for name in written) >= 2  # the demo asks for two drawings
    assert "tokens/s" in p.stdout and "index.html" in p.stdout
    # the demo prompts appear in order: caption, question, drawing, story
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert len(heads) == 4 and "caption" in heads[0] and "story" in heads[3]


def test_inline_prompt_and_trained_checkpoint_folder(tmp_path):
    # a model folder as train.py writes it (MMI.save), and a --prompt with an image path and a final <img>
    import world
    from mmi import MMI, MMIConfig
    MMI(MMIConfig.from_name("tiny")).save(tmp_path / "ck")
    world.render(world.make_scene({"centre": ("red", "circle")})).save(tmp_path / "x.png")
    out = tmp_path / "s"
    p = run([f"--ckpt={tmp_path / 'ck'}", "--prompt=<img:x.png> the red circle turns blue. <img>", "--steps=1",
             "--max_new_tokens=2", f"--out_dir={out}", "--guidance=1"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "p1_1.png").exists() and (out / "p1_3_gen.png").exists()


@pytest.mark.parametrize("args, words", [
    (["--ckpt=/nonexistent/ckpt"], "no checkpoint at /nonexistent/ckpt"),
    (["--ckpt=random", "--prompt=look <img:missing.png>"], "prompt image not found"),
    (["--ckpt=random", "--preset=huge"], "unknown preset 'huge'"),
    (["--ckpt=random", "--prompt_file=/nonexistent.txt"], "prompt file not found"),
    (["--ckpt=random", "--prompt=<img> then text"], "must end the prompt"),
])
def test_clear_errors(tmp_path, args, words):
    p = run([*args, f"--out_dir={tmp_path}"], cwd=tmp_path)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error:"), p.stderr[-2000:]
