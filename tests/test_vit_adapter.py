"""ViT-Adapter: shapes at tiny configs, unchanged ViT tokens at init (zero gammas), which ViT tokens each map fuses,
the official initialisation and LayerNorm eps, gradients and gradient checkpointing, sincos_2d(_resized).
(Parity with the authors' adapter on their own tiny model: tests/test_official.py.)"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vit
from mmfs import MMFS


def tiny_vit(layers=2, image=16, patch=4):
    torch.manual_seed(0)
    cfg = vit.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               patch_size=patch, image_size=image)
    model = vit.VisionTransformer(cfg)
    with torch.no_grad():  # nn.Parameter(torch.empty) and default inits: give every tensor a value
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_adapter(model, **kw):
    return vit.ViTAdapter(model, n_heads=4, n_points=2, spm_channels=8, **kw)


@pytest.mark.parametrize("layers,image,patch,ranges", [
    (2, 16, 4, [(0, 1), (1, 2)]),                    # fewer layers than blocks: one layer each
    (6, 20, 4, [(0, 1), (1, 3), (3, 4), (4, 6)]),    # uneven split, odd grid (5x5)
])
def test_shapes(layers, image, patch, ranges):
    adapter = tiny_adapter(tiny_vit(layers, image, patch))
    assert adapter.ranges == ranges
    g = image // patch
    assert adapter.spm_size == 16 * g
    x = torch.rand(2, 3, 24, 24)  # any input size: resized inside
    with torch.no_grad():
        tokens, maps = adapter(x)
    assert tokens.shape == (2, 1 + g * g, 32)
    expected = [4 * g, 2 * g, g, math.ceil(g / 2)]  # strides 4, 8, 16, 32 of the 16*g spatial-prior input
    assert [tuple(m.shape) for m in maps] == [(2, 32, s, s) for s in expected]
    assert all(torch.isfinite(m).all() for m in maps)


def test_official_split():
    # ViT-L/14 geometry (24 layers, patch 14 at 224) at a small width: the rule gives the official layout
    cfg = vit.CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4)
    adapter = vit.ViTAdapter(vit.VisionTransformer(cfg), spm_channels=8)
    assert adapter.ranges == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert adapter.spm_size == 256
    assert [len(b.extra_extractors) for b in adapter.interactions] == [0, 0, 0, 2]


def test_tokens_equal_plain_vit_at_init():
    model = tiny_vit(layers=3)
    adapter = tiny_adapter(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        tokens, _ = adapter(x)
        plain = model(vit.normalize(x))
    assert torch.equal(tokens, plain)


def test_half_precision_vit():
    # a frozen bf16 ViT under an fp32 adapter (no autocast): tokens stay bf16, maps fp32, still the plain ViT at init
    model = tiny_vit().to(torch.bfloat16)
    adapter = tiny_adapter(model)  # its own parameters are fp32
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        tokens, maps = adapter(x)
        assert tokens.dtype == torch.bfloat16 and all(m.dtype == torch.float32 for m in maps)
        assert torch.equal(tokens, model(vit.normalize(x)))


def perturb_own(adapter, std=0.1):
    """At init the deformable attentions ignore their queries (zero offset and logit weights) and the gammas are 0:
    give every adapter tensor a random value so that every path carries a gradient."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if not n.startswith("vit."):
                p.add_(std * torch.randn(p.shape, generator=g))
    return adapter


def test_gradients_reach_adapter():
    model = tiny_vit(layers=2)
    model.requires_grad_(False)  # frozen, as in the paper
    adapter = perturb_own(tiny_adapter(model))
    tokens, maps = adapter(torch.rand(2, 3, 16, 16))
    loss = tokens.square().mean() + sum(m.square().mean() for m in maps)
    loss.backward()
    own = [(n, p) for n, p in adapter.named_parameters() if not n.startswith("vit.")]
    assert own and all(p.requires_grad for _, p in own)
    no_grad = [n for n, p in own if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    assert all(p.grad is None for p in model.parameters())


def test_maps_fuse_the_tokens_of_each_interaction_block():
    # Official: level i adds the patch tokens after interaction block i, bilinearly resized (x1 up 4x, x2 up 2x,
    # x3 as is, x4 down 2x = a 2x2 average). Silence everything else: the SPM outputs, the level embedding, the
    # up-convolution and the extractors' residuals are zero, the gammas too, so each map is exactly the resized
    # hidden state of the plain ViT after block i.
    model = tiny_vit(layers=4, image=16, patch=4)
    adapter = tiny_adapter(model)
    with torch.no_grad():
        for m in [*(getattr(adapter.spm, f"fc{i}") for i in range(1, 5)), adapter.up]:
            m.weight.zero_(), m.bias.zero_()
        for block in adapter.interactions:
            for ex in [block.extractor, *block.extra_extractors]:
                ex.attn.output_proj.weight.zero_(), ex.ffn.fc2.weight.zero_()
        x = torch.rand(2, 3, 16, 16)
        _, maps = adapter(x, positions=False)
        _, hidden = model(vit.normalize(x), return_hidden_states=True)
    grids = [h[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4) for h in hidden[1:]]  # after layer 1, 2, 3, 4
    bilinear = lambda t, s: F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(maps[0], bilinear(grids[0], 16))
    torch.testing.assert_close(maps[1], bilinear(grids[1], 8))
    torch.testing.assert_close(maps[2], grids[2])
    torch.testing.assert_close(maps[3], F.avg_pool2d(grids[3], 2))
    # positions=True adds the ViT grid's table, resized bicubically to each level
    with torch.no_grad():
        _, with_pos = adapter(x)
    for m, p in zip(maps, with_pos):
        s = m.shape[-1]
        table = vit.sincos_2d_resized(4, s, s, 32).T.reshape(32, s, s)
        torch.testing.assert_close(p, m + table)


def test_official_init_and_eps():
    adapter = tiny_adapter(tiny_vit(layers=4))
    deform = [m for m in adapter.modules() if isinstance(m, MMFS)]
    assert deform and all(m.sampling_offsets.bias.abs().sum() == 0 and m.sampling_offsets.weight.abs().sum() == 0
                          for m in deform)  # CLIP's init zeroes the ring of Deformable DETR
    linears = [m for n, m in adapter.named_modules() if isinstance(m, nn.Linear) and not n.startswith("vit")]
    assert all(m.bias.abs().sum() == 0 for m in linears)
    assert all(b.injector.gamma.abs().sum() == 0 for b in adapter.interactions)
    assert adapter.level_embed.abs().sum() == 0
    norms = {n: m.eps for n, m in adapter.named_modules() if isinstance(m, nn.LayerNorm) and not n.startswith("vit")}
    assert {e for n, e in norms.items() if n.startswith("spm")} == {1e-6}  # channels-first LayerNorms of the SPM
    assert {e for n, e in norms.items() if n.startswith("interactions")} == {1e-5}  # plain nn.LayerNorm
    assert all(m.n_heads == 4 for m in deform)  # the ViT's head count


def test_gradient_checkpointing_recomputes_vit_blocks(monkeypatch):
    model = tiny_vit(layers=2)
    adapter = perturb_own(tiny_adapter(model))
    calls, forward = [], vit.EncoderLayer.forward  # (forward hooks do not see the recomputation: count calls)
    monkeypatch.setattr(vit.EncoderLayer, "forward", lambda self, x: calls.append(1) or forward(self, x))
    x = torch.rand(2, 3, 16, 16)

    def grads(fn):
        calls.clear()
        adapter.zero_grad()
        fn().backward()
        return len(calls), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}

    adapter_loss = lambda: sum(m.square().mean() for m in adapter(x)[1])  # noqa: E731
    vit_loss = lambda: model(vit.normalize(x)).square().mean()  # noqa: E731
    for fn in (adapter_loss, vit_loss):
        model.gradient_checkpointing = False
        n_plain, g_plain = grads(fn)
        model.gradient_checkpointing = True
        n_ckpt, g_ckpt = grads(fn)
        assert (n_plain, n_ckpt) == (2, 4)  # each block runs again in backward
        assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
        for n in g_plain:
            torch.testing.assert_close(g_plain[n], g_ckpt[n], atol=1e-6, rtol=1e-5)
    calls.clear()
    with torch.no_grad():  # no recomputation without autograd, nor in eval mode
        adapter(x)
    adapter.eval()
    adapter_loss().backward()
    assert len(calls) == 4


def official_sincos(dim, size):
    """The authors' table, written out here in numpy float32: rows in the first half of the channels."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / np.float32(dim / 4))
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    def enc(pos):
        angle = pos.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angle), np.cos(angle)], 1)
    return torch.from_numpy(np.concatenate([enc(rows), enc(cols)], 1))


def test_sincos_2d():
    pe = vit.sincos_2d(3, 5, 8)
    assert pe.shape == (15, 8)
    # token (row 1, col 2): first half encodes the row, second half the column; channel 0 = sin(pos * 1)
    row, col = 1, 2
    t = pe[row * 5 + col]
    assert torch.allclose(t[[0, 1, 2, 3]], torch.tensor([math.sin(row), math.sin(row / 100), math.cos(row),
                                                         math.cos(row / 100)]))
    assert torch.allclose(t[[4, 6]], torch.tensor([math.sin(col), math.cos(col)]))
    torch.testing.assert_close(vit.sincos_2d(16, 16, 32), official_sincos(32, 16), atol=2e-6, rtol=0)
    pe[0, 0] = 123.0  # callers get a fresh tensor; the cache stays intact
    assert vit.sincos_2d(3, 5, 8)[0, 0] == 0.0
    with pytest.raises(ValueError):
        vit.sincos_2d(2, 2, 6)


def test_sincos_2d_resized():
    assert torch.equal(vit.sincos_2d_resized(8, 8, 8, 16), vit.sincos_2d(8, 8, 16))  # its own size: the table
    table = official_sincos(16, 8).T.reshape(1, 16, 8, 8)
    for h, w in [(4, 4), (2, 2), (16, 16), (3, 5)]:
        ref = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False).reshape(16, h * w).T
        torch.testing.assert_close(vit.sincos_2d_resized(8, h, w, 16), ref, atol=2e-6, rtol=0)
    assert not torch.allclose(vit.sincos_2d_resized(8, 4, 4, 16), vit.sincos_2d(4, 4, 16))  # not a fresh table
    out = vit.sincos_2d_resized(8, 4, 4, 16, dtype=torch.float64)
    out.zero_()  # a fresh tensor: the cache stays intact
    assert vit.sincos_2d_resized(8, 4, 4, 16).abs().sum() > 0
