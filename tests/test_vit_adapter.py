"""ViT-Adapter: shapes at tiny configs, unchanged ViT tokens at init (zero gammas), gradients, sincos_2d."""
import math

import pytest
import torch

import vit


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


def test_gradients_reach_adapter():
    model = tiny_vit(layers=2)
    model.requires_grad_(False)  # frozen, as in the paper
    adapter = tiny_adapter(model)
    with torch.no_grad():  # gammas at 0 would block the injectors' gradients: open them a little
        for block in adapter.interactions:
            block.injector.gamma.fill_(0.1)
    tokens, maps = adapter(torch.rand(2, 3, 16, 16))
    loss = tokens.square().mean() + sum(m.square().mean() for m in maps)
    loss.backward()
    own = [(n, p) for n, p in adapter.named_parameters() if not n.startswith("vit.")]
    assert own and all(p.requires_grad for _, p in own)
    no_grad = [n for n, p in own if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    assert all(p.grad is None for p in model.parameters())


def test_sincos_2d():
    pe = vit.sincos_2d(3, 5, 8)
    assert pe.shape == (15, 8)
    # token (row 1, col 2): first half encodes the column, second half the row; channel 0 = sin(pos * 1)
    row, col = 1, 2
    t = pe[row * 5 + col]
    assert torch.allclose(t[[0, 1, 2, 3]], torch.tensor([math.sin(col), math.sin(col / 100), math.cos(col),
                                                         math.cos(col / 100)]))
    assert torch.allclose(t[[4, 6]], torch.tensor([math.sin(row), math.cos(row)]))
    pe[0, 0] = 123.0  # callers get a fresh tensor; the cache stays intact
    assert vit.sincos_2d(3, 5, 8)[0, 0] == 0.0
    with pytest.raises(ValueError):
        vit.sincos_2d(2, 2, 6)
