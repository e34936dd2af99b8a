"""Condition distillation (distill.py): the assignment is the minimum-cost one, the set-matched loss ignores the
order of the targets, a text encoding reads back as its scene, and a few steps on the shipped tiny SD's text encoder
lower it, for the warm start on captions and for every drawn image of training rows (MMI.forward(batch, draw=False))."""
import itertools
import random
from pathlib import Path

import pytest
import torch

import data
import distill
import world
from checkpoints import build_model
from tiny_sd import TextEncoder

SD = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"


def test_assignment_is_the_minimum_cost_one():
    rng = random.Random(0)
    for n in (1, 2, 3, 5, 6):
        cost = [[rng.random() for _ in range(n)] for _ in range(n)]
        col = distill.assignment(cost)
        best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[i][p[i]] for i in range(n)))
        assert sorted(col) == list(range(n))
        assert abs(sum(cost[i][col[i]] for i in range(n)) - sum(cost[i][best[i]] for i in range(n))) < 1e-12


def test_set_mse_ignores_the_order_of_the_targets():
    cond = torch.randn(3, 6, 8)
    shuffled = torch.stack([c[torch.randperm(6)] for c in cond])
    assert distill.set_mse(cond, shuffled).item() < 1e-12
    assert distill.set_mse(cond, shuffled + 0.1).item() > 0


def test_read_back_inverts_the_text_encoding():
    encoder, rng = TextEncoder.from_pretrained(SD), random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(20)]
    for scene, cond in zip(scenes, encoder.encode([world.caption(s) for s in scenes])):
        assert distill.read_back(cond[torch.randperm(len(cond))], encoder) == scene  # slot order: irrelevant
    blue = encoder.encode(["a blue circle in the centre."])[0]
    assert distill.read_back(blue, encoder) == world.make_scene({"centre": ("blue", "circle")})
    assert distill.read_back(torch.cat([blue[:1], blue[:1]]), encoder) is None  # two slots name one cell


def test_warm_start_lowers_the_condition_loss():
    torch.manual_seed(0)
    te = TextEncoder.from_pretrained(SD)
    model = build_model("tiny", sd=SD, null_cond=te.encode([""])[0])
    captions = ["a red circle in the centre.", "a blue square in the top left and a green triangle in the centre."]
    with torch.no_grad():
        before = distill.condition_loss(model, te, captions).item()
    distill.warm_start(model, te, steps=30, batch=8, lr=3e-3)
    with torch.no_grad():
        after = distill.condition_loss(model, te, captions).item()
    assert after < 0.5 * before, (before, after)
    assert all(p.grad is None for p in model.image_decoder.unet.parameters())  # no U-Net pass


def test_drawn_loss_reads_the_story_and_skips_the_unet():
    torch.manual_seed(0)
    te = TextEncoder.from_pretrained(SD)
    model = build_model("tiny", sd=SD, null_cond=te.encode([""])[0])
    ds = data.SyntheticDataset(model.tok, model.cfg.n_image_tokens, 128, kinds={"story": 1.0})
    batch = ds.batch(0, 2)
    out = model(batch, draw=False)
    assert out["image_loss"] == 0 and len(out["drawn"]) == len(out["cond"]) > 0
    # the targets are the captions of the edited scenes, read back from the story's own pictures
    scenes = [world.parse_image(x) for x in batch["images"][out["drawn"]]]
    assert all(world.split_of(s) == "train" for s in scenes)
    opt = torch.optim.AdamW(model.param_groups(0.0, 3e-3, 3e-3, 3e-3))
    losses = []
    for _ in range(30):
        loss = distill.drawn_loss(model(batch, draw=False), batch["images"], te)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not losses:  # the story's earlier pictures are read: the gradient reaches the image encoder
            assert model.visual_tokenizer.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in model.image_decoder.unet.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    out = model(batch)  # with the U-Net: the same conditions, and the diffusion loss beside them
    assert out["image_loss"] > 0 and torch.equal(out["drawn"], model(batch, draw=False)["drawn"])
    assert distill.drawn_loss(out, batch["images"], te).item() == pytest.approx(losses[-1], rel=0.5)
