"""sample.py end to end on a random tiny model (the HTML page references every image written) and its clear
one-line errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample

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
    written = sorted(f.name for f in out.glob("p*.png"))
    referenced = sorted(re.findall(r'<img [^>]*src="([^"]+)"', page))
    assert written and written == referenced
    assert (out / "sheet.png").is_file()  # the contact sheet (a random model's text is not Latin-1: shown as "?")
    assert sum(name.endswith("_gen.png") for name in written) >= 4  # the demo asks for four drawings
    assert "tokens/s" in p.stdout and "index.html" in p.stdout
    # the demo prompts appear in order: caption, question, drawing, story, story in two pictures
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert len(heads) == 5 and "caption" in heads[0] and "story" in heads[3] and "two pictures" in heads[4]


def test_a_picture_mid_prompt_then_the_prompt_goes_on(tmp_path):
    """"x. <img> y. <img>": the model draws, the prompt's own text follows its picture, then it draws again."""
    out = tmp_path / "s"
    p = run(["--ckpt=random", "--prompt=a red circle in the centre. <img> the red circle turns blue. <img>",
             "--steps=1", "--max_new_tokens=2", f"--out_dir={out}", "--guidance=1"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in out.glob("p*.png")) == ["p1_2_gen.png", "p1_4_gen.png"]
    page = (out / "index.html").read_text()
    assert page.index("a red circle in the centre.") < page.index("p1_2_gen.png") \
        < page.index("the red circle turns blue.") < page.index("p1_4_gen.png")


def test_inline_prompt_and_trained_checkpoint_folder(tmp_path):
    # a model folder as train.py writes it (checkpoints.save), and a --prompt with an image path and a final <img>
    import world
    from checkpoints import build_model, save
    save(build_model("tiny"), tmp_path / "ck")
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
    (["--ckpt=random", "--prompt=<img> <img>"], "empty prompt"),
])
def test_clear_errors(tmp_path, monkeypatch, error_line, args, words):
    monkeypatch.chdir(tmp_path)  # prompt images are relative to the current folder
    assert words in error_line(sample.main, [*args, f"--out_dir={tmp_path}"])


@pytest.mark.parametrize("flag, words", [
    ("--steps=0", "--steps=0: must be >= 1"), ("--steps=-3", "--steps=-3: must be"),
    ("--temperature=-1", "--temperature=-1.0: must be >= 0"), ("--device=banana", "--device=banana: not a torch"),
    ("--top_p=0", "--top_p=0.0: must be in (0, 1]"), ("--max_new_tokens=0", "--max_new_tokens=0: must be"),
    ("--max_new_tokens=-2", "--max_new_tokens=-2: must be"), ("--prompt=", "--prompt is empty"),
    ("--guidance=nan", "--guidance=nan: must be >= 0"), ("--seed=-1", "--seed=-1: must be >= 0"),
    ("--steps=two", "argument --steps: invalid int value: 'two'"), ("--bogus=1", "unrecognized arguments"),
])
def test_bad_flags_give_one_line(tmp_path, error_line, flag, words):
    assert words in error_line(sample.main, ["--ckpt=random", flag, f"--out_dir={tmp_path}"])


def _broken_checkpoint(folder, how):
    """A model folder as train.py writes it, then broken one way."""
    import json
    from safetensors.torch import load_file, save_file
    from checkpoints import build_model, save
    save(build_model("tiny"), folder)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[5]
    if how == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif how == "shape":
        save_file({**tensors, key: torch.zeros(3, 3)}, file)
    elif how == "nan":
        bad = tensors[key].clone()
        bad.view(-1)[0] = float("inf")
        save_file({**tensors, key: bad}, file)
    elif how == "config":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "not_a_field": 1}))
    return key


@pytest.mark.parametrize("how, words", [("truncated", "corrupt or truncated"), ("shape", "has shape (3, 3)"),
                                        ("nan", "inf values"), ("config", "unknown config keys ['not_a_field']")])
def test_broken_checkpoint_gives_one_line(tmp_path, error_line, how, words):
    key = _broken_checkpoint(tmp_path / "ck", how)
    line = error_line(sample.main, [f"--ckpt={tmp_path / 'ck'}", f"--out_dir={tmp_path / 's'}"])
    assert words in line and str(tmp_path / "ck") in line, line
    if how in ("shape", "nan"):
        assert key in line


def test_rerun_leaves_no_stale_pictures(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "p9_1_gen.png").write_bytes(b"old")
    (out / "mine.png").write_bytes(b"keep")  # not ours: left alone
    p = run(["--ckpt=random", "--steps=1", "--max_new_tokens=2", f"--out_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (out / "p9_1_gen.png").exists() and (out / "mine.png").exists()


def test_int8_llm_demo_captions_the_same(tmp_path, capsys):
    """--quantize=int8 (the LLM's Linear layers, MMFS untouched) on the shipped model: the caption is the pinned one."""
    sample.main(["--quantize=int8", f"--out_dir={tmp_path}"])
    caption = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[caption"))
    pinned = (Path(__file__).parent / "fixtures" / "demo" / "text.txt").read_text().splitlines()[0]
    assert caption == pinned
