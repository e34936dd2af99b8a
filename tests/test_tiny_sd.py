"""tiny_sd.py: the tiny Stable Diffusion's folder round-trips through the official loaders, its stand-in text encoder
reads caption text only and is deterministic from its saved files, and a micro training run writes a loadable folder."""
import json
from pathlib import Path

import pytest
import torch

import tiny_sd
import world
from diffusion import NoiseSchedule
from unet import UNet

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"
MICRO = dict(block_out_channels=[8, 16, 16], attention_head_dim=[1, 2, 2], norm_num_groups=4, cross_attention_dim=16,
             sample_size=32)


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """A 2-step run of tiny_sd.train on a micro U-Net: the end-to-end path (data, loss, eval, save)."""
    out = tmp_path_factory.mktemp("tiny-sd")
    scores = tiny_sd.train(out_dir=str(out), steps=2, batch=2, eval_every=1, eval_n=2, eval_steps=2, final_eval_n=2,
                           unet=MICRO, n_tokens=6)
    assert set(scores) == {"g1", "g2"} and set(scores["g2"]) == {"cell_acc", "object_acc", "exact"}
    return out


def test_micro_run_writes_a_loadable_folder(micro_folder):
    records = [json.loads(line) for line in (micro_folder / "log.jsonl").read_text().splitlines()]
    assert "settings" in records[0] and [r["step"] for r in records[1:]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records[1:])
    net, sched = UNet.from_pretrained(micro_folder), NoiseSchedule.from_pretrained(micro_folder)
    assert net.cfg.block_out_channels == (8, 16, 16) and sched.prediction_type == "v_prediction"
    assert not sched.clip_sample  # guidance in pixel space needs it off (tiny_sd.train says why)
    te = tiny_sd.TextEncoder.from_pretrained(micro_folder)
    assert te.encode(["a red circle in the top left."]).shape == (1, 6, 16)
    # the same objects listed in another order: the same tokens permuted, so the same U-Net prediction
    a = "a red circle in the top left and a blue square in the centre."
    b = "a blue square in the centre and a red circle in the top left."
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(net(x, t, te.encode([a])), net(x, t, te.encode([b])), atol=1e-6)
    assert not list(micro_folder.rglob(".*.tmp"))  # every file went through its temporary and was renamed


@pytest.mark.parametrize("which", ["micro", "shipped"])
def test_folder_round_trips_through_the_official_loaders(which, micro_folder, tmp_path):
    folder = micro_folder if which == "micro" else SHIPPED
    if not (folder / "unet").is_dir():
        pytest.skip("assets/tiny-sd not built")
    net, sched, te = UNet.from_pretrained(folder), NoiseSchedule.from_pretrained(folder), \
        tiny_sd.TextEncoder.from_pretrained(folder)
    tiny_sd.save(tmp_path, net, sched, te)
    net2, sched2 = UNet.from_pretrained(tmp_path / "unet"), NoiseSchedule.from_pretrained(tmp_path / "scheduler")
    assert net2.cfg == net.cfg and sched2.config == sched.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 900])
    ctx = te.encode(["a red circle in the top left.", ""])
    assert torch.equal(net(x, t, ctx), net2(x, t, ctx))
    a = tiny_sd.sample(net, sched, ctx, ctx[1:], steps=2, guidance=2.0, generator=torch.Generator().manual_seed(1))
    b = tiny_sd.sample(net2, sched2, ctx, ctx[1:], steps=2, guidance=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32)


def test_text_encoder_deterministic_from_its_files(tmp_path):
    captions = ["a red circle in the top left and a blue square in the centre.", "", "a pink blob."]
    te = tiny_sd.TextEncoder(seed=3)
    te.save_pretrained(tmp_path / "text_encoder")
    with torch.no_grad():  # the files, not the seed, define the encoder
        te.embed.weight.add_(1.0)
    again = tiny_sd.TextEncoder.from_pretrained(tmp_path)
    assert torch.equal(again.encode(captions), tiny_sd.TextEncoder(seed=3).encode(captions))
    folder_itself = tiny_sd.TextEncoder.from_pretrained(tmp_path / "text_encoder")
    assert torch.equal(again.encode(captions), folder_itself.encode(captions))
    assert not torch.equal(again.encode(captions), te.encode(captions))
    assert not any(p.requires_grad for p in again.parameters())


def test_text_encoder_reads_text_only():
    te = tiny_sd.TextEncoder()
    scene = world.make_scene({"top left": ("red", "circle"), "centre": ("blue", "square"),
                              "bottom middle": ("white", "triangle")})
    with pytest.raises(TypeError):
        te.encode([scene])  # a scene's labels are not an input
    other_order = "a white triangle in the bottom middle, a red circle in the top left and a blue square in the centre."
    c = te.encode([world.caption(scene), other_order])
    assert torch.equal(c[0, [0, 1, 2]], c[1, [1, 2, 0]]) and torch.equal(c[0, 3:], c[1, 3:])
    # one token per object, the rest padding; LayerNorm output: zero mean, unit scale per token
    empty = te.encode([""])
    assert c.shape == (2, te.n_tokens, 64) and torch.equal(c[0, 3:], empty[0, 3:])
    assert (empty[0] == empty[0, 0]).all()  # the empty caption: every token the same <pad>
    assert torch.equal(te.empty(), empty[0]) and torch.equal(te.empty(3), empty[0, :3])
    assert torch.allclose(c.pow(2).mean(-1), torch.ones(2, te.n_tokens), atol=1e-3)
    # every object phrase of the world gets a distinct token (colour, shape and cell all matter)
    phrases = [f"a {c} {s} in the {cell}." for c in world.COLOURS for s in world.SHAPES for cell in world.CELLS]
    tokens = te.encode(phrases)[:, 0]
    assert torch.cdist(tokens, tokens).add(torch.eye(len(phrases)) * 1e9).min() > 1.0


def test_shipped_tiny_sd_draws_held_out_captions():
    if not (SHIPPED / "unet").is_dir():
        pytest.skip("assets/tiny-sd not built")
    net, sched = UNet.from_pretrained(SHIPPED), NoiseSchedule.from_pretrained(SHIPPED)
    scores = tiny_sd.evaluate(net, sched, tiny_sd.TextEncoder.from_pretrained(SHIPPED), n=6, seed=1)
    assert scores["g1"]["object_acc"] >= 0.9 and scores["g2"]["object_acc"] >= 0.9, scores
