"""train.py end to end on a shrunken tiny model (CPU, seconds each): exact resume, 2-process DDP == 1 process,
NaN stops with the last good checkpoint kept, Ctrl-C stops cleanly with a consistent checkpoint, bad corpus data
counted per epoch and in all, a corpus with nothing usable stops at once, argument checks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# a smaller tiny model and short rows so that each run takes seconds
SMALL = ["--seq_len=128", "--n_image_tokens=4", "--llm.n_layers=2", "--llm.dim=64", "--llm.hidden_dim=128",
         "--resampler.layers=1", "--unet.block_out_channels=[16,32,32]", "--unet.attention_head_dim=[1,2,2]",
         "--eval_n=0", "--log_interval=1", "--threads=1", "--sd_path="]  # from scratch: a U-Net of its own size


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(args, out, launcher=None, check=True, timeout=600, small=SMALL, script=ROOT / "train.py"):
    cmd = (launcher or [sys.executable]) + [str(script), f"--out_dir={out}", *small, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
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
    p = run([*common, "--max_steps=5", "--resume=True", "--llm.n_layers=3"], tmp_path / "resumed", check=False)
    assert p.returncode != 0 and "--resume keeps the checkpoint's model" in p.stderr.strip().splitlines()[-1]
    ck = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    assert {"optimizer", "scheduler", "rng", "data_pos"} <= ck.keys()
    (tmp_path / "plain").write_text("")  # every file written is at least as readable as a plain new file (not 0600)
    readable = (tmp_path / "plain").stat().st_mode & 0o444
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "resumed").iterdir()}
    assert all(int(m, 8) & readable == readable for m in modes.values()), modes


def test_evaluations_do_not_change_the_training(tmp_path):
    """The recipe's evaluation schedule is a choice of what to log: a run evaluated every 2 steps (text and pictures)
    ends with the same weights as one evaluated only at the end (the evaluation draws from its own generator)."""
    common = ["--batch_size=2", "--warmup_steps=2", "--max_steps=4", "--eval_n=1", "--eval_kinds=qa,story",
              "--eval_steps=2"]
    run([*common, "--eval_interval=2"], tmp_path / "evaluated")
    run([*common, "--eval_interval=0"], tmp_path / "plain")
    assert sum("eval" in json.loads(x) for x in open(tmp_path / "evaluated" / "log.jsonl")) == 2
    assert losses(tmp_path / "evaluated") == losses(tmp_path / "plain")
    assert_same_weights(weights(tmp_path / "evaluated"), weights(tmp_path / "plain"), 0.0)


def test_eval_interval_with_no_examples_evaluates_nothing(tmp_path):
    run(["--batch_size=1", "--max_steps=2", "--eval_interval=1"], tmp_path / "o")  # SMALL sets --eval_n=0
    assert not any("eval" in json.loads(x) for x in open(tmp_path / "o" / "log.jsonl"))


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


def test_ddp_step_that_leaves_parameters_unused_still_moves_them(tmp_path):
    """Without the U-Net pass (--diffusion=False) the image decoder takes no part in the loss: DDP finds those
    parameters unused, and they get a zero gradient, so AdamW still decays them (as it does every other parameter)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = ["--batch_size=1", "--warmup_steps=1", "--diffusion=False", "--weight_decay=0.5"]
    run([*common, "--max_steps=1"], tmp_path / "one", launcher=launcher)
    run([*common, "--max_steps=2"], tmp_path / "two", launcher=launcher)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    # its decayed weights (matrices; not the sampling offsets, and not the zero-initialised taps: 0 decays to 0),
    # the U-Net's included: trained here (no --sd_path)
    decoder = [k for k in one if k.startswith("image_decoder.") and one[k].dim() >= 2 and one[k].any()
               and "sampling_offsets" not in k]
    assert decoder and [k for k in decoder if torch.equal(one[k], two[k])] == []


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
    # one row per epoch: epochs 0 and 1 end, step 3 reads epoch 2; each epoch skips the same 3 lines again
    assert "epoch 0 done: skipped 3 documents" in report and "; 3 in all" in report
    assert "epoch 1 done: skipped 3 documents" in report and "; 6 in all" in report
    done = [line for line in report.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "skipped 9 documents" in done[0] and done[0].endswith(" in all"), done
    recs = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [(r["epoch"], r["skipped"], r["skipped_in_all"]) for r in recs if "epoch" in r] == [(0, 3, 3), (1, 3, 6)]
    assert recs[-1]["skipped_in_all"] == 9 and recs[-1]["skipped_kinds"]["missing image"] == 3
    # resumed in the middle of epoch 2: the counts carry on
    p = run(["--batch_size=1", "--max_steps=4", f"--data={tmp_path / 'c.jsonl'}", "--resume=True"], tmp_path / "out")
    assert "epoch 2 done: skipped 3 documents (invalid json: 1, missing image: 1, corrupt image: 1); 9 in all" \
        in p.stdout
    assert "skipped 12 documents" in [line for line in p.stdout.splitlines() if line.startswith("done:")][0]


def test_corpus_with_nothing_usable_stops_at_once(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"items": [ broken\n{"foo": 1}\n\n')
    for files, why in [("empty.jsonl", "no document"),
                       ("bad.jsonl,empty.jsonl", "skipped 2 documents (invalid json: 1, bad format: 1), kept none")]:
        paths = ",".join(str(tmp_path / f) for f in files.split(","))
        p = run(["--max_steps=5", f"--data_paths={paths}"], tmp_path / "out", check=False, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
        assert lines[0].startswith("error: --data_paths: nothing usable in") and why in lines[0], lines[0]
        assert all(str(tmp_path / f) in lines[0] for f in files.split(","))


def test_system_flags_are_one_line_errors(tmp_path, error_line):
    import train
    cases = [(f"--data_paths={tmp_path / 'no.jsonl'}", f"--data_paths: no such file: {tmp_path / 'no.jsonl'}"),
             ("--dtype=float8", "--dtype=float8 is not one of float32, bfloat16, float16"),
             ("--device=tpu", "--device=tpu is not one of cpu, cuda, cuda:N")]
    if not torch.cuda.is_available():
        cases.append(("--device=cuda", "--device=cuda but torch"))
    for arg, words in cases:
        line = error_line(train.main, [f"--out_dir={tmp_path / 'out'}", *SMALL, arg, "--max_steps=1"])
        assert line.startswith("error: " + words), (arg, line)


def test_ctrl_c_stops_cleanly_with_a_consistent_checkpoint(tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--out_dir={out}", *SMALL, "--batch_size=1", "--max_steps=1000",
           "--ckpt_interval=1", "--warmup_steps=1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # a checkpoint is written every step: this lands in a step or in a save
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert err.rstrip().endswith(f"The last good checkpoint is {out / 'ckpt.pt'} (step {ck['step']}).")
    w = weights(out)  # model.safetensors is from the same step as ckpt.pt
    assert all(torch.equal(w[k], ck["model"][k]) for k in w) and not (out / ".saving").exists()
    run(["--batch_size=1", f"--max_steps={ck['step'] + 1}", "--resume=True", "--warmup_steps=1"], out)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == ck["step"] + 1


def test_argument_type_checks(tmp_path, error_line):
    p = run(["--max_steps=0", "--compile=False", "--grad_checkpointing=1", "--lr=3e-4"], tmp_path / "a")
    assert "compile = False" in p.stdout and "grad_checkpointing = True" in p.stdout and "lr = 0.0003" in p.stdout
    import train
    for bad, words in [("--batch_size=two", "expects int"), ("--compile=maybe", "expects bool"),
                       ("--no_such_field=3", "unknown config field"), ("--preset=huge", "unknown preset"),
                       ("max_steps=3", "expected --key=value")]:
        assert words in error_line(train.main, [f"--out_dir={tmp_path / 'b'}", *SMALL, bad, "--max_steps=0"]), bad


def test_eval_only_prints_every_metric(tmp_path):
    from checkpoints import build_model, save
    save(build_model("tiny", freeze_unet=False), tmp_path / "model")
    knobs = [a for a in SMALL if not a.startswith(("--n_image_tokens", "--llm.", "--resampler.", "--unet."))]
    p = run(["--eval_only=True", f"--init_from={tmp_path / 'model'}", "--eval_n=1", "--eval_seed=3"], tmp_path / "o",
            small=knobs)  # the model is the folder's (the full tiny one): model-config flags would be refused
    metrics = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"i2t_exact", "qa_exact", "t2i_cell_acc", "t2i_object_acc", "story_cell_acc",
            "story_object_acc"} <= metrics.keys()
    assert all(0 <= v <= 1 for v in metrics.values())


def test_evaluation_draws_each_example_from_its_own_noise(tmp_path):
    """Held-out scores do not depend on the number of processes (rank r scores examples r, r + 2, ...) or on the
    kinds evaluated before: each example draws from its own noise. The score here is the drawn picture's mean
    pixel, which any other noise moves (a random model: its pictures are the noise, shaped)."""
    from checkpoints import build_model, save
    save(build_model("tiny", freeze_unet=False), tmp_path / "model")
    script = tmp_path / "eval_pixels.py"  # train.py with world.score replaced by the picture's mean pixel
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train, world\n"
                      "world.score = lambda ex, pred: {'mean': float(pred.mean())}\ntrain.main(sys.argv[1:])\n")

    def scores(kinds, launcher=None):
        p = run(["--eval_only=True", f"--init_from={tmp_path / 'model'}", "--eval_n=3", f"--eval_kinds={kinds}",
                 "--eval_steps=2"], tmp_path / "o", launcher=launcher, small=["--threads=1"], script=script)
        return json.loads(p.stdout.strip().splitlines()[-1])

    one = scores("t2i,story")
    two = scores("t2i,story", launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"])
    assert one == two
    assert scores("story")["story_mean"] == one["story_mean"]


def test_built_on_a_tiny_stable_diffusion_keeps_its_unet_frozen(tmp_path):
    """--sd_path: the U-Net and schedule come from a tiny SD folder (tiny_sd.py) and stay as they were; the null
    condition starts from its encoding of the empty caption; the new modules train."""
    import tiny_sd
    from checkpoints import load
    from unet import UNet
    sd = tmp_path / "sd"
    tiny_sd.train(out_dir=str(sd), steps=1, batch=2, eval_every=0, final_eval_n=1, eval_steps=1,
                  unet=dict(block_out_channels=[16, 32, 32], attention_head_dim=[1, 2, 2]))
    small = [a for a in SMALL if not a.startswith("--unet.")]  # the U-Net is the folder's
    run([f"--sd_path={sd}", "--max_steps=2", "--ckpt_interval=2"], tmp_path / "o", small=small)
    model, base = load(tmp_path / "o"), UNet.from_pretrained(sd)
    assert model.cfg.freeze_unet
    for (name, p), q in zip(model.image_decoder.unet.state_dict().items(), base.state_dict().values()):
        assert torch.equal(p, q), name
    null, ours = tiny_sd.TextEncoder.from_pretrained(sd).encode([""])[0], model.image_decoder.null_cond
    assert ours.shape == null.shape and not torch.equal(ours, null)  # started there, trained


def test_the_two_stage_recipe(tmp_path):
    """assets/make_tiny.sh in small: stage 1 (warm start, then text + distillation, no U-Net pass) leaves the U-Net's
    MMFS taps at their zero init; stage 2 (--init_from, the paper's losses + the distillation) trains them."""
    import tiny_sd
    from checkpoints import load
    sd = tmp_path / "sd"
    tiny_sd.train(out_dir=str(sd), steps=1, batch=2, eval_every=0, final_eval_n=1, eval_steps=1,
                  unet=dict(block_out_channels=[16, 32, 32], attention_head_dim=[1, 2, 2]))
    small = [a for a in SMALL if not a.startswith("--unet.")] + [f"--sd_path={sd}", "--kinds=t2i:0.5,story:0.5"]
    run(["--warm_steps=2", "--warm_batch=2", "--diffusion=False", "--distill_weight=1", "--max_steps=2"],
        tmp_path / "s1", small=small)
    run([f"--init_from={tmp_path / 's1'}", "--distill_weight=1", "--max_steps=2"], tmp_path / "s2", small=small)
    warm = [json.loads(line) for line in open(tmp_path / "s1" / "log.jsonl") if '"warm_steps"' in line]
    assert len(warm) == 1 and warm[0]["warm_steps"] == 2 and warm[0]["condition_mse"] > 0  # the warm start is logged
    logs = [[json.loads(line) for line in open(tmp_path / s / "log.jsonl") if '"loss"' in line] for s in ("s1", "s2")]
    assert all(r["image_loss"] == 0 and r["distill_loss"] > 0 for r in logs[0])
    assert all(r["image_loss"] > 0 and r["distill_loss"] > 0 for r in logs[1])
    taps = [load(tmp_path / s).image_decoder.taps for s in ("s1", "s2")]
    assert all(t.zero.weight.abs().max() == 0 for t in taps[0]) and all(t.zero.weight.abs().max() > 0 for t in taps[1])
