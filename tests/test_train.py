"""train.py end to end on a shrunken tiny model (CPU, seconds each): exact resume, 2-process DDP == 1 process,
NaN stops with the last good checkpoint kept, bad corpus data counted, argument type checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# a smaller tiny model and short rows so that each run takes seconds
SMALL = ["--seq_len=128", "--n_image_tokens=4", "--llm.n_layers=2", "--llm.dim=64", "--llm.hidden_dim=128",
         "--res_layers=1", "--unet.block_out_channels=[16,32,32]", "--unet.attention_head_dim=[1,2,2]",
         "--eval_n=0", "--log_interval=1", "--threads=1"]


def run(args, out, launcher=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), f"--out_dir={out}", *SMALL, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out):
    recs = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"]) for r in recs if "loss" in r}


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_resume_is_exact(tmp_path):
    common = ["--batch_size=2", "--warmup_steps=3", "--schedule=constant"]
    run([*common, "--max_steps=4"], tmp_path / "straight")
    run([*common, "--max_steps=2"], tmp_path / "resumed")
    run([*common, "--max_steps=4", "--resume=True"], tmp_path / "resumed")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"), 1e-6)
    ck = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    assert {"optimizer", "scheduler", "rng", "data_pos"} <= ck.keys()


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"truncated")
    p = run(["--resume=True", "--max_steps=1"], out, check=False)
    assert p.returncode != 0 and "cannot read checkpoint" in p.stderr and str(out / "ckpt.pt") in p.stderr
    assert "Traceback" not in p.stderr


def test_ddp_two_processes_equal_one(tmp_path):
    # global batch of 2 micro-batches of 1 row: 2 processes x 1, or 1 process accumulating 2
    common = ["--batch_size=1", "--max_steps=2", "--warmup_steps=1"]
    run([*common, "--grad_accum=2"], tmp_path / "one")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(common, tmp_path / "two", launcher=launcher)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), 1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    p = run(["--batch_size=1", "--max_steps=6", "--ckpt_interval=1", "--warmup_steps=1", "--lr=1e30",
             "--grad_clip=0"], out, check=False)
    assert p.returncode != 0
    msg = [line for line in p.stderr.splitlines() if "loss is" in line]
    assert msg and msg[0].startswith("step "), p.stderr[-2000:]
    bad_step = int(msg[0].split()[1].rstrip(":"))
    ck = torch.load(out / "ckpt.pt", weights_only=True)  # intact, and from before the bad step
    assert ck["step"] == bad_step and f"(step {bad_step})" in msg[0]
    assert not list(out.glob(".*.tmp"))


def test_corpus_bad_data_is_counted(tmp_path):
    from PIL import Image
    import world
    img = world.render(world.make_scene({"centre": ("red", "circle")}))
    img.save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps({"image": "a.png", "caption": "a red circle in the centre."}),
             "{not json",
             json.dumps({"image": "missing.png", "caption": "x"}),
             json.dumps({"image": "broken.png", "caption": "y"}),
             json.dumps({"items": [{"text": "a black square."}, {"image": "b.png"}]})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    p = run(["--batch_size=1", "--max_steps=3", f"--data={tmp_path / 'c.jsonl'}"], tmp_path / "out")
    report = p.stdout
    assert "skipped 3 documents" in report, report[-2000:]
    assert "c.jsonl:2" in report and "missing image" in report and "corrupt image" in report


def test_argument_type_checks(tmp_path):
    p = run(["--max_steps=0", "--compile=False", "--grad_checkpointing=1", "--lr=3e-4"], tmp_path / "a")
    assert "compile = False" in p.stdout and "grad_checkpointing = True" in p.stdout and "lr = 0.0003" in p.stdout
    for bad, words in [("--batch_size=two", "expects int"), ("--compile=maybe", "expects bool"),
                       ("--no_such_field=3", "unknown config field"), ("--preset=huge", "unknown preset"),
                       ("max_steps=3", "expected --key=value")]:
        p = run([bad, "--max_steps=0"], tmp_path / "b", check=False)
        assert p.returncode != 0 and words in p.stderr, (bad, p.stderr[-500:])
        assert "Traceback" not in p.stderr
