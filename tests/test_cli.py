"""Every input a user gives is checked before work starts, with one line naming it and its limit: numeric flags
against their ranges (cli.py, and each script's RANGES covers every numeric flag), the model's limits (context,
images per document) against what a prompt or a corpus asks, and the folders a run writes to."""
import inspect
from pathlib import Path

import pytest
import torch

import cli
import sample
import tiny_sd
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("x, rule, ok", [
    (1, ">= 1", True), (0, ">= 1", False), (0.5, "> 0", True), (0.0, "> 0", False), (3, "<= 3", True),
    (3, "< 3", False), (0.0, "[0, 1)", True), (1.0, "[0, 1)", False), (1.0, "(0, 1]", True), (0.0, "(0, 1]", False),
    (float("nan"), ">= 0", False), (float("inf"), ">= 0", False), (-float("inf"), "< 0", False),
])
def test_range_rules(x, rule, ok):
    assert cli.in_range(x, rule) is ok


def test_range_errors_name_the_flag_and_the_limit():
    cli.check_ranges({"lr": 0.1, "n": 3}, {"lr": "> 0", "n": ">= 1", "absent": ">= 0"})
    with pytest.raises(SystemExit, match=r"^error: --top_p=1.5: must be in \(0, 1\]$"):
        cli.check_ranges({"top_p": 1.5}, {"top_p": "(0, 1]"})
    with pytest.raises(SystemExit, match=r"^error: --lr=nan: must be > 0$"):
        cli.check_ranges({"lr": float("nan")}, {"lr": "> 0"})
    with pytest.raises(ValueError, match="not a range rule"):
        cli.in_range(1, "about 3")


def test_flags_are_typed_by_their_defaults():
    defaults = dict(steps=10, lr=0.1, name="a", flag=False, unet=None)
    got = cli.parse_flags(["--steps=3", "--lr=1e-3", "--name=b", "--flag=yes", "--unet={'x': [1, 2]}"], defaults)
    assert got == dict(steps=3, lr=1e-3, name="b", flag=True, unet={"x": [1, 2]})
    extra = {}
    assert cli.parse_flags(["--llm.dim=64", "--act=silu"], defaults, extra=extra) == {}
    assert extra == {"llm.dim": 64, "act": "silu"}
    for bad, words in [(["--steps=2.5"], "--steps expects int, got '2.5'"), (["--flag=maybe"], "--flag expects bool"),
                       (["--nope=1"], "unknown flag --nope; the flags are --steps, --lr"),
                       (["steps=1"], "expected --key=value")]:
        with pytest.raises(SystemExit, match=f"^error: {words}"):
            cli.parse_flags(bad, defaults)


def test_output_folder_must_be_creatable(tmp_path):
    assert cli.writable_dir(tmp_path / "a" / "b", "out_dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --out_dir=.*file/sub: cannot write there \(Not a directory\)$"):
        cli.writable_dir(tmp_path / "file" / "sub", "out_dir")


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in sample.p._actions if a.type in (int, float)}
    assert numeric and numeric == sample.RANGES.keys()
    numeric = {k for k, v in inspect.signature(tiny_sd.train).parameters.items() if type(v.default) in (int, float)}
    assert numeric and numeric == tiny_sd.RANGES.keys()
    numeric = {k for k in train.knob_names if type(train.DEFAULTS[k]) in (int, float)}
    assert numeric and numeric == train.RANGES.keys()


@pytest.mark.parametrize("args, words", [
    (["--steps=0"], "--steps=0: must be >= 1"), (["--p_uncond=1.5"], "--p_uncond=1.5: must be in [0, 1]"),
    (["--lr=nan"], "--lr=nan: must be > 0"), (["--lr=abc"], "--lr expects float, got 'abc'"),
    (["--no_such=1"], "unknown flag --no_such"),
])
def test_tiny_sd_flags(args, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        tiny_sd.main([*args, f"--out_dir={tmp_path}"])
    assert str(e.value).startswith(f"error: {words}")


def test_every_output_folder_is_checked_first(tmp_path, error_line):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "out"
    words = f"error: --out_dir={bad}: cannot write there (Not a directory)"
    assert error_line(tiny_sd.main, [f"--out_dir={bad}"]) == words
    assert error_line(train.main, [f"--out_dir={bad}", "--max_steps=1"]) == words
    assert error_line(sample.main, ["--ckpt=random", f"--out_dir={bad}"]) == words


@pytest.mark.parametrize("args, words", [
    (["--beta1=1"], "--beta1=1.0: must be in [0, 1)"), (["--grad_accum=0"], "--grad_accum=0: must be >= 1"),
    (["--eval_guidance=nan"], "--eval_guidance=nan: must be >= 0"),
    (["--schedule=linear"], "--schedule=linear is not one of cosine, constant"),
    (["--eval_kinds=i2t,poems"], "--eval_kinds=i2t,poems: each must be one of"),
    (["--kinds=t2i:-1"], "--kinds expects kind:weight pairs"),
    (["--seq_len=4096"], "--seq_len=4096: the model's context holds 512 positions"),
    (["--seq_len=12"], "--seq_len=12: a row must hold <s>, one image (17 positions)"),
    (["--max_images=2"], "documents may hold 3 images; the model sees at most max_images=2"),
    (["--quantize=int4"], "--quantize=int4 is not one of , int8"),
    (["--quantize=int8"], "--quantize=int8 is for a frozen LLM loaded from --llm_path"),
    (["--warm_steps=5"], "--warm_steps needs the tiny world's --sd_path"),
    (["--distill_weight=1"], "--distill_weight needs the tiny world's --sd_path"),
    (["--distill_weight=-1"], "--distill_weight=-1.0: must be >= 0"),
    (["--story_min_shapes=5"], "--story_min_shapes=5: must be in [1, 4]"),
    (["--eval_only=True"], "--eval_only=True scores held-out examples: it needs --eval_n >= 1"),
])
def test_train_flags_choices_and_limits(tmp_path, error_line, args, words):
    small = [f"--out_dir={tmp_path / 'o'}", "--max_steps=1", "--eval_n=0", "--sd_path="]
    assert error_line(train.main, small + args).startswith(f"error: {words}")


def test_synthetic_world_flags_with_a_corpus(tmp_path, error_line):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text_list": ["a line."], "image_info": []}\n')
    small = [f"--out_dir={tmp_path / 'o'}", "--max_steps=1", "--eval_n=0", "--sd_path=", f"--data={corpus}"]
    for flag in ("--story_min_shapes=3", "--kinds=qa:1"):
        assert error_line(train.main, small + [flag]) == (
            f"error: {flag.split('=')[0]} shapes the synthetic world's documents; --data_paths reads corpora instead")


def test_model_config_flags_that_would_be_ignored(tmp_path, error_line, capsys):
    small = [f"--out_dir={tmp_path / 'o'}", "--max_steps=1", "--eval_n=0", "--sd_path="]
    train.main(small + [f"--out_dir={tmp_path / 'm'}", "--llm.n_layers=1"])
    again = small + [f"--init_from={tmp_path / 'm'}", "--max_steps=0"]
    train.main(again + ["--llm.n_layers=1"])  # agrees with the folder's model: fine
    capsys.readouterr()  # the two runs' progress bars
    assert error_line(train.main, again + ["--mmfs.points=4"]) == (
        f"error: --mmfs.points=4: the model of --init_from={tmp_path / 'm'} has 2 (its config.json); "
        "model-config flags build a new model, they do not change one")


def test_prompts_beyond_the_models_limits(tmp_path, error_line):
    long_text = "a red circle in the centre. " * 100
    line = error_line(sample.main, ["--ckpt=random", f"--out_dir={tmp_path}", f"--prompt={long_text}"])
    assert "needs 702 positions" in line and "the model's context holds 512" in line
    images = f"<img:{ROOT / 'assets' / 'story_1.png'}> " * 8 + "<img>"  # 8 given + 1 to draw
    line = error_line(sample.main, ["--ckpt=random", f"--out_dir={tmp_path}", f"--prompt={images}"])
    assert line == "error: prompt [prompt] has 9 images; the model sees at most 8 per document"


def test_generate_checks_the_prompt_before_any_work():
    from generate import generate
    from mmi import MMI, MMIConfig
    model = MMI(MMIConfig.from_name("tiny", **{"llm.max_seq_len": 64}, max_images=1)).eval()
    image = torch.rand(3, model.cfg.image_size, model.cfg.image_size)
    with pytest.raises(ValueError, match="the prompt needs 102 positions .* context holds 64"):
        generate(model, [" ".join(["red"] * 100)])  # <s> + 100 words + the first new token
    with pytest.raises(ValueError, match="the prompt has 2 images; the model sees at most 1 per document"):
        generate(model, [image, "then", image])
    with pytest.raises(ValueError, match="the prompt has 2 images"):
        generate(model, [image], begin_image=True)
