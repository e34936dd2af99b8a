"""MMFS and its deformable-attention op: the op against the formula of docs/kernel.md, gradients, and the module's semantics
(visibility, joint softmax, image recency, null key, batch independence, adapter mode, pre-projected values); on
packed rows, the gathered path (each token samples only the images it sees) against the masked computation it
replaced, forward and gradients, through the torch op and through the kernel's CPU build."""
import itertools
import math
import shutil
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import mmfs
import mmfs_kernel
from mmfs import MMFS, deform_attn, deform_attn_cpu, deform_attn_reference, image_recency, level_starts, pixel_centres


# -----------------------------------------------------------------------------
# The op


def bilinear(V, x, y):
    """V [H, W, C] at normalised (x, y) by the formula of docs/kernel.md: h = y*H - 0.5, w = x*W - 0.5, bilinear between
    the four surrounding pixels, a pixel outside [0,H) x [0,W) counting as zero."""
    H, W, C = V.shape
    h, w = float(y) * H - 0.5, float(x) * W - 0.5
    h0, w0 = math.floor(h), math.floor(w)
    lh, lw = h - h0, w - w0

    def px(i, j):
        return V[i, j] if 0 <= i < H and 0 <= j < W else V.new_zeros(C)

    return ((1 - lh) * (1 - lw) * px(h0, w0) + (1 - lh) * lw * px(h0, w0 + 1)
            + lh * (1 - lw) * px(h0 + 1, w0) + lh * lw * px(h0 + 1, w0 + 1))


def loop_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """The op, one sampling point at a time."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(B, Q, M, D)
    loc, a = sampling_locations.tolist(), attention_weights.tolist()
    start = 0
    for l, (H, W) in enumerate(spatial_shapes.tolist()):
        V = value[:, start:start + H * W].view(B, H, W, M, D)
        start += H * W
        for b, q, m, p in itertools.product(range(B), range(Q), range(M), range(P)):
            out[b, q, m] += a[b][q][m][l][p] * bilinear(V[b, :, :, m], *loc[b][q][m][l][p])
    return out.reshape(B, Q, M * D)


def make_op_inputs(B=2, Q=5, M=2, D=3, P=3, shapes=((3, 5), (2, 3)), images=2, lo=-0.3, hi=1.3, seed=0,
                   dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(list(shapes) * images)                                   # images folded into levels
    L = len(ss)
    S = int((ss[:, 0] * ss[:, 1]).sum())
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    w = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)                     # deliberately not normalised
    return value, ss, level_starts(ss), loc, w


def test_reference_matches_formula_inside_outside_and_on_borders():
    value, ss, starts, loc, w = make_op_inputs()
    # Exact borders, pixel centres and grid lines of the first level (3 x 5) and just outside the map.
    special = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.1, 0.5 / 3], [0.5, 1 / 3], [-0.1, 0.5],
                            [1.1, 0.5], [0.5, -0.2], [0.5, 1.0 + 0.5 / 3], [-5.0, 7.0]], dtype=value.dtype)
    loc[0, :, :, :, :2] = special[torch.arange(5 * 2 * 4 * 2) % len(special)].view(5, 2, 4, 2, 2)
    ref = deform_attn_reference(value, ss, starts, loc, w)
    torch.testing.assert_close(ref, loop_deform_attn(value, ss, loc, w), rtol=1e-12, atol=1e-12)


def test_reference_single_level_square_and_single_image():
    value, ss, starts, loc, w = make_op_inputs(B=1, Q=4, M=3, D=2, P=2, shapes=((4, 4),), images=1, seed=1)
    torch.testing.assert_close(deform_attn_reference(value, ss, starts, loc, w),
                               loop_deform_attn(value, ss, loc, w), rtol=1e-12, atol=1e-12)


def test_reference_output_channel_order_is_head_then_channel():
    # Weight only head 1: the output's first D channels (head 0) are zero, the next D are head 1's.
    value, ss, starts, loc, w = make_op_inputs(M=2, D=3)
    w[:, :, 0] = 0
    out = deform_attn_reference(value, ss, starts, loc, w)
    assert out[..., :3].abs().max() == 0 and out[..., 3:].abs().max() > 0


def test_reference_rejects_inconsistent_shapes():
    value, ss, starts, loc, w = make_op_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        deform_attn_reference(value[:, 1:], ss, starts, loc, w)


def off_grid_locations(loc, ss, margin=0.05):
    """Move every location off the pixel grid lines (h or w an integer), where the bilinear gradient jumps."""
    L = len(ss)
    size = ss.flip(-1).to(loc.dtype).view(1, 1, 1, L, 1, 2)                    # (W, H) per level
    pix = loc * size - 0.5
    frac = pix - pix.floor()
    pix = pix + torch.where((frac < margin) | (frac > 1 - margin), 0.3, 0.0)
    return (pix + 0.5) / size


def test_reference_gradcheck():
    value, ss, starts, loc, w = make_op_inputs(B=1, Q=3, M=2, D=2, P=2, seed=2)
    loc = off_grid_locations(loc, ss)
    for t in (value, loc, w):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, a: deform_attn_reference(v, ss, starts, l, a), (value, loc, w))


def cpu_path_inputs(seed):
    """Op inputs for deform_attn_cpu vs the reference: batch 2, 3 points, levels of different shapes (non-square, a
    1-pixel-wide one) repeated over 2 images (so same-shape levels are apart), locations inside, outside, exactly on
    the map's edges (0, 1), on pixel centres and on grid lines (integer pixel coordinates, where the bilinear
    gradient jumps: both must take grid_sample's side)."""
    value, ss, starts, loc, w = make_op_inputs(B=2, Q=7, M=2, D=3, P=3, shapes=((4, 5), (2, 3), (3, 1)), images=2,
                                               seed=seed)
    size = ss.flip(-1).to(loc.dtype).view(1, 1, 1, len(ss), 1, 2)                  # (W, H) per level
    edges = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=loc.dtype)
    loc[:, 0] = edges[torch.randint(0, 4, loc[:, 0].shape, generator=torch.Generator().manual_seed(seed))]
    loc[:, 1] = ((loc[:, 1] * size).floor() + 0.5) / size.squeeze(1)                 # pixel centres
    loc[:, 2] = (loc[:, 2] * size).round() / size.squeeze(1)                          # grid lines
    return value, ss, starts, loc, w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_path_matches_the_reference_forward_and_gradients(seed):
    value, ss, starts, loc, w = cpu_path_inputs(seed)
    for t in (value, loc, w):
        t.requires_grad_(True)
    ref, out = deform_attn_reference(value, ss, starts, loc, w), deform_attn_cpu(value, ss, starts, loc, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (value, loc, w), g), torch.autograd.grad(ref, (value, loc, w), g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cpu_path_without_grad_mixed_precision_and_errors():
    value, ss, starts, loc, w = cpu_path_inputs(3)
    with torch.no_grad():  # the in-place weighting
        torch.testing.assert_close(deform_attn_cpu(value, ss, starts, loc, w),
                                   deform_attn_reference(value, ss, starts, loc, w), rtol=1e-12, atol=1e-12)
    v16, loc32, w32 = value.bfloat16(), loc.float(), w.float()
    out = deform_attn_cpu(v16, ss, starts, loc32, w32)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, deform_attn_reference(v16, ss, starts, loc32, w32))
    with pytest.raises(ValueError, match="spatial_shapes"):
        deform_attn_cpu(value[:, 1:], ss, starts, loc, w)


def test_deform_attn_uses_the_cpu_path_on_cpu_and_the_reference_when_forced(monkeypatch):
    calls = []
    for name in ("deform_attn_cpu", "deform_attn_reference"):
        monkeypatch.setattr(mmfs, name, lambda *a, name=name, f=getattr(mmfs, name): calls.append(name) or f(*a))
    args = make_op_inputs()
    deform_attn(*args)
    monkeypatch.setenv("MMI_DEFORM_REFERENCE", "1")
    deform_attn(*args)
    assert calls == ["deform_attn_cpu", "deform_attn_reference"]
    monkeypatch.delenv("MMI_DEFORM_REFERENCE")
    monkeypatch.setattr(mmfs, "_kernel_failed", False)
    value = args[0]
    assert not mmfs._wants_kernel(value)                                      # CPU tensor
    gpu_like = types.SimpleNamespace(is_cuda=True)
    assert mmfs._wants_kernel(gpu_like)
    monkeypatch.setenv("MMI_DEFORM_REFERENCE", "1")
    assert not mmfs._wants_kernel(gpu_like)


def test_deform_attn_falls_back_with_one_warning_when_the_kernel_is_unavailable(monkeypatch):
    class KernelUnavailable(RuntimeError):
        pass

    calls = []

    def cuda_deform_attn(*args, reference):
        calls.append(1)
        raise KernelUnavailable("no nvrtc here")

    fake = types.SimpleNamespace(KernelUnavailable=KernelUnavailable, cuda_deform_attn=cuda_deform_attn)
    monkeypatch.setitem(sys.modules, "mmfs_kernel", fake)
    monkeypatch.setattr(mmfs, "_kernel_failed", False)
    monkeypatch.setattr(mmfs, "_wants_kernel", lambda v: not mmfs._kernel_failed)  # pretend the tensors are on a GPU
    args = make_op_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, out2 = deform_attn(*args), deform_attn(*args)
    assert len(calls) == 1 and len(caught) == 1 and "no nvrtc here" in str(caught[0].message)
    assert torch.equal(out1, deform_attn_reference(*args)) and torch.equal(out2, out1)


# -----------------------------------------------------------------------------
# The module

SHAPES = torch.tensor([[4, 6], [2, 3]])  # one image's levels, non-square
S = 4 * 6 + 2 * 3


def tiny_mmfs(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(query_dim=12, value_dim=10, n_heads=2, n_levels=2, n_points=3, head_dim=4, out_dim=8,
               offset_init=1.5, max_images=6, base_grid=(2, 3))
    cfg.update(kw)
    m = MMFS(**cfg).double()
    with torch.no_grad():  # break the zero initialisations so every path is exercised
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def inputs(B=2, Q=4, N=3, seed=0, dim=12, vdim=10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Q, dim, generator=g, dtype=torch.float64)
    ref = torch.rand(B, Q, 2, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, S, vdim, generator=g, dtype=torch.float64)
    return q, ref, v


@torch.no_grad()
def loop_mmfs(m, query, ref, value, shapes, visible):
    """docs/official.md's MMFS written out for one query and one visible image at a time (invisible images are skipped,
    not masked): per-image query Linear(q) + E[relpos], offsets and logits per (image, head, level, point), one
    softmax per head over everything plus the null key (logit 0, zero value), output projection."""
    B, Q, _ = query.shape
    N = value.shape[1]
    M, L, P, D = m.n_heads, m.n_levels, m.n_points, m.head_dim
    out = []
    for b, q in itertools.product(range(B), range(Q)):
        vals = m.value_proj(value[b])                                            # (N, S, M*D)
        vis = visible[b, q].tolist()
        logits, samples = [], []                                                 # one (M,) and (M, D) per key
        for n in (n for n in range(N) if vis[n]):
            qn = query[b, q]
            if m.max_images is not None:
                qn = m.query_proj(qn) + m.image_embed.weight[sum(vis[n:])]      # most recent visible image: 1
            off = m.sampling_offsets(qn).view(M, -1, P, 2)                       # (M, 1 or L, P, 2)
            logit = m.attention_weights(qn).view(M, L, P)
            start = 0
            for l, (H, W) in enumerate(shapes.tolist()):
                V = vals[n, start:start + H * W].view(H, W, M, D)
                start += H * W
                cells = m.base_grid[::-1] if m.shared_offsets else (W, H)        # as (x, y)
                for p in range(P):
                    o = off[:, 0 if m.shared_offsets else l, p]                  # (M, 2)
                    x, y = ref[b, q, 0] + o[:, 0] / cells[0], ref[b, q, 1] + o[:, 1] / cells[1]
                    logits.append(logit[:, l, p])
                    samples.append(torch.stack([bilinear(V[:, :, h], x[h], y[h]) for h in range(M)]))
        if m.null_slot:
            logits.append(query.new_zeros(M))
            samples.append(query.new_zeros(M, D))
        a = torch.stack(logits).softmax(0)                                       # (keys, M)
        out.append(m.output_proj((a[..., None] * torch.stack(samples)).sum(0).flatten()))
    return torch.stack(out).view(B, Q, -1)


def test_module_matches_the_formula_written_out():
    m = tiny_mmfs()
    q, ref, v = inputs()
    vis = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(5)) > 0.3
    vis[1, 3] = False
    torch.testing.assert_close(m(q, ref, v, SHAPES, vis), loop_mmfs(m, q, ref, v, SHAPES, vis),
                               rtol=1e-10, atol=1e-12)


def test_adapter_mode_matches_the_formula_written_out():
    m = tiny_mmfs(max_images=None, null_slot=False, shared_offsets=False)
    q, ref, v = inputs(N=1)
    torch.testing.assert_close(m(q, ref, v, SHAPES), loop_mmfs(m, q, ref, v, SHAPES, torch.ones(2, 4, 1).bool()),
                               rtol=1e-10, atol=1e-12)


def test_image_recency_counts_visible_images_backwards():
    vis = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, False]])
    assert image_recency(vis).tolist() == [[3, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 0]]


def test_masked_images_contribute_exactly_nothing():
    m = tiny_mmfs()
    q, ref, v = inputs()
    vis = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    vis[:, :, 1] = torch.tensor([[True, False, True, False], [False, True, False, False]])
    out = m(q, ref, v, SHAPES, vis)
    v2 = v.clone()
    v2[:, 1] = torch.randn_like(v2[:, 1]) * 100                                # change image 1 only
    out2 = m(q, ref, v2, SHAPES, vis)
    sees = vis[:, :, 1]
    assert torch.equal(out[~sees], out2[~sees])                                # bit-identical where image 1 is masked
    assert (out[sees] - out2[sees]).abs().amax(-1).min() > 1e-6                # and it matters where it is visible


def test_softmax_is_joint_across_images():
    # Image 0 has zero features (zero value: value_proj's bias is zeroed), so it adds nothing to the sum; making it
    # visible still changes the output because it takes attention mass from image 1 in the one joint softmax.
    # (Image 1 stays the most recent visible image, so its index embedding is unchanged.)
    m = tiny_mmfs()
    with torch.no_grad():
        m.value_proj.bias.zero_()
        m.sampling_offsets.weight.mul_(0.1)                                    # keep the points on the maps
        m.sampling_offsets.bias.mul_(0.1)
    m.output_proj = torch.nn.Identity()                                        # look at the heads' outputs
    q, ref, v = inputs(N=2)
    ref[:] = 0.5
    v[:, 0] = 0
    only_1 = m(q, ref, v, SHAPES, torch.tensor([False, True])).unflatten(-1, (2, 4))   # (B, Q, head, channel)
    both = m(q, ref, v, SHAPES, torch.tensor([True, True])).unflatten(-1, (2, 4))
    # Per head, image 1's contribution is scaled down by the share of mass image 0 took: same direction, shorter.
    ratio = both.norm(dim=-1) / only_1.norm(dim=-1)
    assert (ratio < 1 - 1e-3).all()
    torch.testing.assert_close(both, ratio[..., None] * only_1, rtol=1e-10, atol=1e-12)


def test_image_index_embedding_depends_on_recency():
    # Swapping two visible images changes which one is "most recent": with the embedding the output changes,
    # without it (max_images=None) the sum over images is order-free.
    q, ref, v = inputs(N=2)
    swapped = v.flip(1)
    m = tiny_mmfs()
    assert (m(q, ref, v, SHAPES) - m(q, ref, swapped, SHAPES)).abs().amax(-1).min() > 1e-6
    m0 = tiny_mmfs(max_images=None)
    torch.testing.assert_close(m0(q, ref, v, SHAPES), m0(q, ref, swapped, SHAPES), rtol=1e-12, atol=1e-12)


def test_query_that_sees_no_image_outputs_exactly_the_output_bias():
    m = tiny_mmfs()
    q, ref, v = inputs()
    vis = torch.ones(2, 4, 3, dtype=torch.bool)
    vis[0, 2] = False
    vis[1, 0] = False
    out = m(q, ref, v, SHAPES, vis)
    assert torch.equal(out[0, 2], m.output_proj.bias) and torch.equal(out[1, 0], m.output_proj.bias)
    assert not torch.equal(out[0, 1], m.output_proj.bias)
    out.sum().backward()                                                       # -inf logits give no NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_null_key_weighs_like_the_official_null_slots():
    # With all logits zero, every (visible image, level, point) and the null key get the same weight:
    # official N*L null slots of logit -log(N*L) sum to the one key of logit 0. Check it through the output:
    # identical images, features constant c -> output = output_proj(weight_sum * value_proj(c)).
    m = tiny_mmfs()
    with torch.no_grad():
        m.attention_weights.weight.zero_()
        m.attention_weights.bias.zero_()
        m.image_embed.weight.zero_()
    q, ref, v = inputs(N=3)
    v[:] = 0.7
    ref[:] = 0.5
    with torch.no_grad():
        m.sampling_offsets.bias.zero_()
        m.sampling_offsets.weight.zero_()                                      # every point at a pixel-interior centre
    vis = torch.tensor([True, False, True])
    out = m(q, ref, v, SHAPES, vis)
    n = 2 * 2 * 3                                                              # visible images x levels x points
    expect = m.output_proj(n / (n + 1) * m.value_proj(v[0, 0, 0]))
    torch.testing.assert_close(out, expect.expand_as(out), rtol=1e-12, atol=1e-12)


def test_shared_offsets_sample_the_same_normalised_point_on_every_level():
    # One image, one point per head, offset bias 0: all levels are sampled at the reference point. A feature that is a
    # linear ramp in x on every level then reads back the reference's x on every level (bilinear is exact on ramps).
    m = tiny_mmfs(n_points=1, max_images=None, null_slot=False)
    with torch.no_grad():
        m.attention_weights.bias.zero_()                                       # equal weights: 1/2 per level
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0]))     # +-0.5 base cells (base_grid (2, 3))
    value = torch.cat([((torch.arange(w) + 0.5) / w).repeat(h) for h, w in SHAPES.tolist()])   # x of each pixel
    value = value.view(1, 1, S, 1).expand(1, 1, S, 10).double()
    m.value_proj = torch.nn.Identity()                                         # read the ramp itself
    m.head_dim = 5
    m.output_proj = torch.nn.Identity()
    ref = torch.tensor([[[0.45, 0.5]]], dtype=torch.float64)
    out = m(torch.zeros(1, 1, 12, dtype=torch.float64), ref, value, SHAPES)    # (1, 1, 2 heads * 5)
    got = out.view(2, 5)[:, 0]
    # each head splits its weight over the 2 levels, both read x = 0.45 +- 0.5/3: the average is that x.
    torch.testing.assert_close(got, torch.tensor([0.45 + 0.5 / 3, 0.45 - 0.5 / 3], dtype=torch.float64))


def test_batch_entries_are_independent():
    m = tiny_mmfs()
    q, ref, v = inputs()
    vis = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(3)) > 0.4
    both = m(q, ref, v, SHAPES, vis)
    for b in range(2):
        one = m(q[b:b + 1], ref[b:b + 1], v[b:b + 1], SHAPES, vis[b:b + 1])
        torch.testing.assert_close(one[0], both[b], rtol=1e-12, atol=1e-12)


def test_pre_projected_values_give_the_same_output_bit_for_bit():
    # Decoding projects each image once (project_values) and reuses it for every token: the same result exactly.
    for dtype in (torch.float64, torch.float32):
        m = tiny_mmfs().to(dtype)
        q, ref, v = (t.to(dtype) for t in inputs())
        vis = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(6)) > 0.3
        raw = m(q, ref, v, SHAPES, vis)
        projected = m.project_values(v)
        assert projected.shape == (2, 3, S, m.n_heads * m.head_dim)
        assert torch.equal(m(q, ref, projected, SHAPES, vis, value_projected=True), raw)
        # per position: projecting one image at a time and stacking them is the same values
        one_by_one = torch.stack([m.project_values(v[:, n]) for n in range(3)], 1)
        torch.testing.assert_close(one_by_one, projected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_gradients_reach_every_parameter_and_input():
    m = tiny_mmfs()
    q, ref, v = inputs()
    q.requires_grad_(True)
    v.requires_grad_(True)
    m(q, ref, v, SHAPES, torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(4)) > 0.3).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_default_init_follows_official():
    m = MMFS(16, 24, n_heads=4, n_levels=3, n_points=8, offset_init=3.0, max_images=10)
    assert m.sampling_offsets.weight.abs().max() == 0
    assert m.sampling_offsets.bias.abs().max() <= 3.0 and m.sampling_offsets.bias.abs().max() > 1.0
    assert m.attention_weights.bias.abs().max() == 0 and m.value_proj.bias.abs().max() == 0
    assert m.output_proj.bias.abs().max() == 0 and 0.01 < m.image_embed.weight.std() < 0.03
    assert m.sampling_offsets.out_features == 4 * 8 * 2                         # per (head, point): shared by levels
    assert m.attention_weights.out_features == 4 * 3 * 8


def test_adapter_mode_is_single_image_msdeformattn():
    torch.manual_seed(0)
    m = MMFS(16, 16, n_heads=2, n_levels=2, n_points=4, head_dim=4, max_images=None, null_slot=False,
             shared_offsets=False)
    assert not hasattr(m, "image_embed") and m.sampling_offsets.out_features == 2 * 2 * 4 * 2
    # Deformable-DETR ring init: head 0 looks right (+x), head 1 left; point p at p+1 cells of its level.
    bias = m.sampling_offsets.bias.view(2, 2, 4, 2)
    torch.testing.assert_close(bias[0, 1, :, 0], torch.arange(1.0, 5.0))
    torch.testing.assert_close(bias[1, 0, :, 0], -torch.arange(1.0, 5.0))
    q, ref = torch.randn(3, 24, 16), pixel_centres(4, 6)
    value = torch.randn(3, 1, S, 16, requires_grad=True)
    out = m(q, ref, value, SHAPES)
    assert out.shape == (3, 24, 16)
    out.square().sum().backward()
    assert value.grad.abs().sum() > 0 and all(p.grad is not None for p in m.parameters())
    # Constant features: attention weights sum to one (no null key), so the output is exactly the projected constant
    # when all points fall inside the map (offsets 0, reference at the centre).
    with torch.no_grad():
        m.sampling_offsets.bias.zero_()
    const = m(q, torch.full((24, 2), 0.5), torch.ones(3, 1, S, 16), SHAPES)
    torch.testing.assert_close(const, m.output_proj(m.value_proj(torch.ones(16))).expand_as(const))


def test_pixel_centres_are_row_major_xy():
    c = pixel_centres(2, 4)
    assert c.shape == (8, 2)
    torch.testing.assert_close(c[1], torch.tensor([0.375, 0.25]))
    torch.testing.assert_close(c[4], torch.tensor([0.125, 0.75]))


def test_reference_mixed_precision_samples_at_full_precision_locations():
    value, ss, starts, loc, w = make_op_inputs(dtype=torch.float32)
    out = deform_attn_reference(value.bfloat16(), ss, starts, loc, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), deform_attn_reference(value.bfloat16().float(), ss, starts, loc, w),
                               rtol=1e-2, atol=1e-2)


def test_bf16_module_runs_and_stays_close_to_fp64():
    m = tiny_mmfs().to(torch.bfloat16)
    q, ref, v = inputs()
    out = m(q.bfloat16(), ref, v.bfloat16(), SHAPES)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), tiny_mmfs().to(torch.bfloat16).double()(q.bfloat16().double(), ref,
                               v.bfloat16().double(), SHAPES), rtol=0.05, atol=0.05)


def test_max_images_bounds_what_a_token_sees_not_the_row():
    """A packed row may hold more images than max_images (other documents' images are invisible); a token that sees
    more than max_images is an error that says so."""
    m = tiny_mmfs(max_images=2)
    q, ref, v = inputs(B=1, Q=4, N=4)
    visible = torch.zeros(1, 4, 4, dtype=torch.bool)
    visible[0, :2, :2] = True   # document 1: images 0-1
    visible[0, 2:, 2:] = True   # document 2: images 2-3
    m(q, ref, v, SHAPES, visible)
    visible[0, 3] = True        # a token that sees all four
    with pytest.raises(ValueError, match="sees 4 images but max_images=2"):
        m(q, ref, v, SHAPES, visible)


# -----------------------------------------------------------------------------
# Packed rows: each token samples only the images it sees


def masked_mmfs(m, query, reference_points, value, spatial_shapes, visible):
    """MMFS as it was computed before it gathered the visible images: every token samples every image of its row
    (images folded into the op's levels) and the images it does not see get -inf logits. The reference here."""
    B, Q, _ = query.shape
    N, S_ = value.shape[1:3]
    M, L, P = m.n_heads, m.n_levels, m.n_points
    visible = visible.expand(B, Q, N)
    if m.max_images is None:
        offsets, logits = m.sampling_offsets(query)[:, :, None], m.attention_weights(query)[:, :, None]
    else:
        relpos, q, E = image_recency(visible), m.query_proj(query), m.image_embed.weight
        offsets = m.sampling_offsets(q)[:, :, None] + F.embedding(relpos, E @ m.sampling_offsets.weight.T)
        logits = m.attention_weights(q)[:, :, None] + F.embedding(relpos, E @ m.attention_weights.weight.T)
    offsets = offsets.unflatten(-1, (M, 1 if m.shared_offsets else L, P, 2))
    if m.shared_offsets:
        h, w = m.base_grid or spatial_shapes[0].tolist()
        cells = offsets.new_tensor([w, h])
    else:
        cells = spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :]
    loc = reference_points.expand(B, Q, 2)[:, :, None, None, None, None, :] + offsets / cells
    loc = loc.expand(B, Q, N, M, L, P, 2).transpose(2, 3).reshape(B, Q, M, N * L, P, 2)
    logits = logits.unflatten(-1, (M, L * P)).expand(B, Q, N, M, L * P)
    logits = logits.masked_fill(~visible[..., None, None], float("-inf")).transpose(2, 3).reshape(B, Q, M, -1)
    if m.null_slot:
        logits = torch.cat([logits, logits.new_zeros(B, Q, M, 1)], -1)
    weights = logits.softmax(-1)[..., :N * L * P].view(B, Q, M, N * L, P)
    shapes = spatial_shapes.repeat(N, 1)
    v = m.project_values(value).reshape(B, N * S_, M, m.head_dim)
    return m.output_proj(deform_attn_reference(v, shapes, level_starts(shapes), loc, weights))


def packed_visibility(docs, images, T=12):
    """visible [B, T, N] of packed rows, by MMI.layout's rule: a token sees an image of its own document whose BoI is
    before it. docs: per row, the first position of each document; images: per row, (document, BoI position)."""
    N = max(len(r) for r in images)
    doc = torch.tensor([[sum(t >= s for s in starts) - 1 for t in range(T)] for starts in docs])    # (B, T)
    img_doc = torch.tensor([[d for d, _ in r] + [-1] * (N - len(r)) for r in images])             # (B, N)
    img_pos = torch.tensor([[p for _, p in r] + [T] * (N - len(r)) for r in images])
    return (doc[:, :, None] == img_doc[:, None]) & (torch.arange(T)[None, :, None] > img_pos[:, None])


# row 0: two documents with images (tokens 0-1 and 7-8 see none); row 1: a document without images, then one with
# one image (slots 1-2 are padding, seen by nobody); row 2: one document, 3 images (its last tokens see all three)
PACKED = packed_visibility(docs=[[0, 7], [0, 4], [0]], images=[[(0, 1), (0, 4), (1, 8)], [(1, 5)],
                                                                [(0, 0), (0, 3), (0, 6)]])
CONFIGS = {"llm": {}, "far offsets": dict(offset_init=6.0), "offsets per level": dict(shared_offsets=False),
           "no image index": dict(max_images=None)}


def packed_inputs(dtype=torch.float64, seed=0):
    q, ref, v = inputs(B=3, Q=12, N=3, seed=seed)
    return [t.to(dtype).requires_grad_(t is not ref) for t in (q, ref, v)]


def test_packed_rows_cover_the_cases():
    seen = PACKED.sum(-1)
    assert (seen == 0).any() and (seen == 3).any() and not PACKED.all()            # no image, and all of a row
    assert not PACKED[1, :, 1:].any()                                                # padding slots: seen by nobody
    assert PACKED[0, 9:, 2].all() and not PACKED[0, 9:, :2].any()                    # the other document's image


def assert_matches_masked(m):
    """m on the packed rows == the masked computation, forward and gradients (queries, values, parameters)."""
    q, ref, v = packed_inputs()
    out, masked = m(q, ref, v, SHAPES, PACKED), masked_mmfs(m, q, ref, v, SHAPES, PACKED)
    torch.testing.assert_close(out, masked, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    params = [q, v, *m.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(masked, params, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_gathered_visible_images_match_the_masked_computation(config):
    m = tiny_mmfs(**CONFIGS[config])
    assert_matches_masked(m)


def test_gathered_path_in_fp32_stays_within_float_tolerance():
    # Same maths; sampling positions normalised to the atlas round a little differently from positions normalised
    # to each map (error about 2x the masked computation's, both against fp64).
    m, m64 = tiny_mmfs().float(), tiny_mmfs()
    q, ref, v = packed_inputs(torch.float32)
    exact = m64(*packed_inputs(), SHAPES, PACKED)
    for out in (m(q, ref, v, SHAPES, PACKED), masked_mmfs(m, q, ref, v, SHAPES, PACKED)):
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)


def test_without_null_key_every_token_sees_an_image():
    m = tiny_mmfs(null_slot=False, max_images=None, shared_offsets=False)
    vis = PACKED[2:, 1:]                                                             # tokens 1-11 of row 2
    q, ref, v = (t[2:, 1:] if t.shape[1] == 12 else t[2:] for t in packed_inputs())
    torch.testing.assert_close(m(q, ref, v, SHAPES, vis), masked_mmfs(m, q, ref, v, SHAPES, vis),
                               rtol=1e-10, atol=1e-12)


def test_when_no_token_sees_an_image_every_token_reads_the_null_key():
    m = tiny_mmfs()
    q, ref, v = packed_inputs()
    out = m(q, ref, v, SHAPES, torch.zeros_like(PACKED))
    assert torch.equal(out, m.output_proj.bias.expand_as(out))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_op_gets_one_query_per_visible_image(monkeypatch):
    # The work of the op scales with the images tokens see: one query per (token, visible image), one atlas level.
    calls = []

    def spy(value, shapes, starts, loc, weights):
        calls.append((loc.shape, shapes.shape))
        return deform_attn_reference(value, shapes, starts, loc, weights)

    monkeypatch.setattr(mmfs, "deform_attn", spy)
    m = tiny_mmfs()
    q, ref, v = packed_inputs()
    m(q, ref, v, SHAPES, PACKED)
    (loc_shape, shapes_shape), = calls
    assert loc_shape == (1, int(PACKED.sum()), m.n_heads, 1, m.n_levels * m.n_points, 2) and shapes_shape == (1, 2)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ builds the kernel's CPU emulation")
def test_kernel_route_matches_the_masked_computation(monkeypatch):
    # The CUDA kernel's source, built for the CPU, fed by the gathered path (what a GPU run would do).
    monkeypatch.setattr(mmfs, "deform_attn", mmfs_kernel.cpu_emulated_deform_attn)
    m = tiny_mmfs()
    assert_matches_masked(m)
