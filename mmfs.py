"""MMFS, the Multi-Modal Feature Synchronizer of MM-Interleaved (paper Sec. 3.2, eq. 4), and the deformable attention
op it is built on.

A query token (an LLM hidden state, a U-Net pixel, a ViT token) reads fine image detail straight from the multi-scale
feature maps of the images before it. For every image it predicts a few sampling points around a reference point and
one logit per point; the output is the softmax-weighted sum of the features sampled (bilinearly) at those points. The
softmax runs jointly over all images and levels, together with a "null" key of zero value, so a token can spread its
attention over several images, or read nothing at all. In rows packed with several documents a token samples only the
images it sees (image_atlas): the work scales with those, not with the images of the row.

    deform_attn            the op, in Deformable-DETR layouts; the CUDA kernel of kernels/ on GPU tensors
    deform_attn_reference  the same op in pure torch (F.grid_sample); the definition the kernel is tested against
    deform_attn_cpu        the same op, laid out for speed on CPU tensors (what deform_attn runs on the CPU)
    image_atlas            (token, image) pairs that each read one of many images -> one call of the op
    MMFS                   the module; its three uses in MM-Interleaved (docs/official.md):
      LLM      MMFS(5120, 1024, n_heads=16, n_levels=3, n_points=8, head_dim=64, offset_init=3, max_images=50,
                    base_grid=16)   values: levels 32/16/8 of every image, reference point (0.5, 0.5)
      U-Net    MMFS(C_skip, 1024, n_heads=16, n_levels=4, n_points=8, head_dim=64, offset_init=1, max_images=1,
                    base_grid=(h, w) of the skip)   values: 4 adapter levels 64/32/16/8 of the previous image (N=1;
                    visible False where there is none), reference points = pixel_centres(h, w) of the skip
      Adapter  MMFS(1024, 1024, n_heads=16, n_levels=3, n_points=4, head_dim=32, max_images=None, null_slot=False,
                    shared_offsets=False)   plain single-image MSDeformAttn of Deformable DETR / ViT-Adapter
"""
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The op


def level_starts(spatial_shapes):
    """[L, 2] (H, W) -> [L]: where each level starts in the flattened value."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def pixel_centres(h, w, device=None, dtype=torch.float32):
    """Normalised (x, y) centres of an h x w grid, row-major: [h*w, 2]. Reference points of queries that are pixels."""
    y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(h * w, 2)


def deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention in pure torch.

    value               [B, S, M, D]        S = sum_l H_l*W_l: levels one after another, each row-major
    spatial_shapes      [L, 2] int64        (H_l, W_l); several images are simply more levels
    level_start_index   [L]                 where each level starts along S
    sampling_locations  [B, Q, M, L, P, 2]  (x, y) in [0, 1]; 0 = outer edge of the first pixel, centres at (j+0.5)/W
    attention_weights   [B, Q, M, L, P]     used as given (never renormalised here)
    returns             [B, Q, M*D]         channels ordered (head, channel)

    out[b,q,m] = sum_{l,p} a[b,q,m,l,p] * bilinear(value[b, level l, head m], loc[b,q,m,l,p]), zero outside the map,
    which is exactly grid_sample(align_corners=False, padding_mode="zeros") at 2*loc - 1.
    Levels of equal (H, W) (the same level of different images) share one grid_sample call, and each call's samples
    [B*M*k, D, Q, P] are reduced over points at once, so one group's samples are alive at a time (in training,
    autograd also keeps them for backward: that is the memory the CUDA kernel saves).
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    _, groups = _level_groups(spatial_shapes, S, L)                     # (H, W) -> levels of that shape
    starts = level_start_index.tolist()
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # never sample at bf16-rounded locations
    value, weights = value.to(dtype), attention_weights.to(dtype)
    grid = 2 * sampling_locations.to(dtype) - 1                         # grid_sample's [-1, 1] convention

    out = 0
    for (H, W), levels in groups.items():
        out = out + _sample_levels(value, starts, H, W, levels, grid, weights)  # (B, M, D, Q)
    return out.permute(0, 3, 1, 2).reshape(B, Q, M * D).to(out_dtype)


def _sample_levels(value, starts, H, W, levels, grid, weights):
    """sum over `levels` (all of shape H x W) and points of weight * bilinear sample: [B, M, D, Q]. A function of its
    own so that its [B*M*k, D, Q, P] samples are freed before the next group's are made."""
    B, _, M, D = value.shape
    _, Q, _, _, P, _ = grid.shape
    k = len(levels)
    v = torch.stack([value[:, starts[l]:starts[l] + H * W] for l in levels], 1)       # (B, k, H*W, M, D)
    v = v.permute(0, 3, 1, 4, 2).reshape(B * M * k, D, H, W)
    g = grid[:, :, :, levels].permute(0, 2, 3, 1, 4, 5).reshape(B * M * k, Q, P, 2)
    a = weights[:, :, :, levels].permute(0, 2, 3, 1, 4).reshape(B * M * k, 1, Q, P).contiguous()  # faster product
    sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M*k, D, Q, P)
    weighted = sampled * a if sampled.requires_grad else sampled.mul_(a)  # in place when autograd is off
    return weighted.sum(-1).view(B, M, k, D, Q).sum(2)


def deform_attn_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """deform_attn_reference (same arguments, same result to float rounding), faster on CPUs at the tiny model's
    shapes (measured by bench/bench_mmfs.py --case=tiny; figures in bench/README.md). Two layout changes:
      - the points go in grid_sample's row axis and the queries in its column axis: grid [B*M*k, P, Q, 2], samples
        [B*M*k, D, P, Q]. grid_sample's CPU kernels vectorise along an output row, which is then Q long instead of
        P (2-8) long, and the weighting and the sum over points run along contiguous Q, not a short last axis.
      - levels are taken with split (one concatenation in backward) instead of per-level slices or indexing,
        each of which autograd answers with a zero-filled gradient of the whole input.
    (A dense form, per level the matrix of bilinear weights [Q, H*W] times the values, is exact too, but was
    slower on the tiny model's maps, down to 2x2: building the weights costs more than grid_sample.)"""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes, groups = _level_groups(spatial_shapes, S, L)
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # never sample at bf16-rounded locations
    grid = (2 * sampling_locations.to(dtype) - 1).permute(0, 2, 3, 4, 1, 5)      # (B, M, L, P, Q, 2)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 4, 1)                   # (B, M, L, P, Q)
    order = [l for levels in groups.values() for l in levels]                      # levels, group after group
    if order != list(range(L)):  # same-shape levels apart (several images): one gather puts them together
        grid, weights = grid[:, :, order], weights[:, :, order]
    sizes = [len(levels) for levels in groups.values()]
    values = value.to(dtype).split([h * w for h, w in shapes], 1)                  # per level (B, H*W, M, D)
    out = 0
    for ((H, W), levels), g, a in zip(groups.items(), grid.split(sizes, 2), weights.split(sizes, 2)):
        k = len(levels)
        v = torch.stack([values[l] for l in levels], 1).permute(0, 3, 1, 4, 2).reshape(B * M * k, D, H, W)
        sampled = F.grid_sample(v, g.reshape(B * M * k, P, Q, 2), mode="bilinear", padding_mode="zeros",
                                align_corners=False)                              # (B*M*k, D, P, Q)
        a = a.reshape(B * M * k, 1, P, Q)
        weighted = sampled * a if sampled.requires_grad else sampled.mul_(a)      # in place when autograd is off
        out = out + weighted.sum(2).view(B, M, k, D, Q).sum(2)                    # (B, M, D, Q)
    return out.permute(0, 3, 1, 2).reshape(B, Q, M * D).to(out_dtype)


def _level_groups(spatial_shapes, S, L):
    """-> [(H, W)] per level, {(H, W): [levels of that shape]}; checks them against S positions and L levels."""
    shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
    if len(shapes) != L or S != sum(h * w for h, w in shapes):
        raise ValueError(f"deform_attn: value has {S} positions and locations {L} levels, "
                         f"but spatial_shapes is {shapes}")
    groups = {}
    for l, hw in enumerate(shapes):
        groups.setdefault(hw, []).append(l)
    return shapes, groups


_kernel_failed = False  # set once the CUDA kernel could not be imported or built: we stop trying


def _wants_kernel(value):
    return value.is_cuda and os.environ.get("MMI_DEFORM_REFERENCE") != "1" and not _kernel_failed


def _kernel_unavailable(err):
    global _kernel_failed
    _kernel_failed = True
    warnings.warn(f"mmfs: CUDA deformable-attention kernel unavailable ({err}); using the pure-torch reference "
                  "(slower, more memory)", stacklevel=3)


def deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op of deform_attn_reference (same arguments and result). CUDA tensors run the kernel of kernels/deform_attn.cu (loaded by mmfs_kernel.py) unless
    MMI_DEFORM_REFERENCE=1; if that kernel cannot be imported or built we warn once and use the reference. CPU
    tensors run deform_attn_cpu (never slower at the shapes measured), unless MMI_DEFORM_REFERENCE=1."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _wants_kernel(value):
        try:
            import mmfs_kernel  # lazily: CPU users never touch the CUDA build
        except ImportError as e:
            _kernel_unavailable(e)
        else:
            try:
                return mmfs_kernel.cuda_deform_attn(*args, reference=deform_attn_reference)
            except mmfs_kernel.KernelUnavailable as e:
                _kernel_unavailable(e)
    if value.device.type == "cpu" and os.environ.get("MMI_DEFORM_REFERENCE") != "1":
        return deform_attn_cpu(*args)
    return deform_attn_reference(*args)


def image_atlas(value, spatial_shapes, image, sampling_locations, attention_weights):
    """Pairs that each read one image of many -> the arguments of one call of the op that samples the same points:
    batch 1, one query per pair, one level (the atlas) with L*P points.

    value               [I, S, M, D]        I images, each with the levels of spatial_shapes [L, 2] (H, W)
    image               [pairs]             the image each pair reads
    sampling_locations  [pairs, M, L, P, 2] on the pair's own image; attention_weights [pairs, M, L, P]
    returns             value [1, S', M, D], spatial_shapes [[H', W']], level_start_index [0],
                        locations [1, pairs, M, 1, L*P, 2], weights [1, pairs, M, 1, L*P]

    The atlas is a grid of c x r image blocks, each block the image's levels one below the other, left-aligned, each
    level followed by a zero row and the block by a zero column; a point keeps its pixel coordinates within its
    level. Columns right of a narrower level are zeros, as outside a map. A point within one pixel of its level (its
    pixel coordinates in (-1, H) and (-1, W)) has its bilinear taps in the level or in zeros, as on its own map; a
    point further out reads zeros on its own map but could reach another level here, so its weight is set to zero
    (and so are its gradients). The grid is near square, so that the normalised coordinates of the op, rounded to
    the precision of the dtype, stay as close to the pixel as possible."""
    I, _, M, D = value.shape
    pairs, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    R, Wb = sum(h + 1 for h, _ in shapes), max(w for _, w in shapes) + 1        # rows and columns of a block
    c = math.ceil(math.sqrt(I * R / Wb))                                          # blocks per atlas row
    r = math.ceil(I / c)
    atlas, consts, row, start = value.new_zeros(r * c, R, Wb, M, D), [], 0, 0
    for h, w in shapes:
        atlas[:I, row:row + h, :w] = value[:, start:start + h * w].view(I, h, w, M, D)
        consts.append([[w / (c * Wb), h / (r * R)], [0.0, row / (r * R)], [0.5 + 0.5 / w, 0.5 + 0.5 / h]])
        row, start = row + h + 1, start + h * w
    atlas = atlas.view(r, c, R, Wb, M, D).transpose(1, 2).reshape(1, r * R * c * Wb, M, D)   # (r, R, c, Wb) rows
    # per (level, point, x|y), so that the elementwise ops below run along contiguous memory (on CPUs, a broadcast
    # short last axis, here P=2 points, is many times slower)
    scale, shift, half = sampling_locations.new_tensor(consts).transpose(0, 1)[:, :, None].expand(3, L, P, 2) \
        .contiguous()
    block = torch.stack([image % c, image // c], -1).to(scale.dtype) / scale.new_tensor([c, r])   # (pairs, 2)
    loc = torch.addcmul((shift + block[:, None, None])[:, None], sampling_locations, scale)  # (pairs, M, L, P, 2)
    inside_x, inside_y = ((sampling_locations - 0.5).abs() < half).unbind(-1)  # pixel coordinates in (-1, W), (-1, H)
    inside = inside_x & inside_y
    return (atlas, spatial_shapes.new_tensor([[r * R, c * Wb]]), spatial_shapes.new_zeros(1),
            loc.view(1, pairs, M, 1, L * P, 2), (attention_weights * inside).view(1, pairs, M, 1, L * P))


# -----------------------------------------------------------------------------
# The module


def image_recency(visible):
    """visible [..., N] bool (images ordered by position) -> [..., N] long: the most recent visible image is 1, the
    visible one before it 2, and so on; invisible images are 0. The index into MMFS's image-index embedding."""
    v = visible.long()
    return (v.sum(-1, keepdim=True) - v.cumsum(-1) + 1) * v  # visible images at or after n, for visible n


class MMFS(nn.Module):
    """Multi-image multi-scale deformable attention with a null key (docs/official.md, "MMFS inside the LLM").

    query_dim, value_dim   widths of the query tokens and of the image features
    n_heads, head_dim      attention heads; value_proj maps value_dim -> n_heads*head_dim (head_dim: value_dim/n_heads)
    n_levels, n_points     feature levels per image, sampling points per (image, head, level)
    out_dim                output width (default query_dim)
    offset_init            initial offsets are U(-offset_init, offset_init) cells of the base grid
    max_images             size of the image-index embedding; None = no per-image query projection nor embedding
    null_slot              add the null key (a query that sees no image outputs exactly output_proj.bias)
    shared_offsets         True: offsets per (image, head, point), the same normalised point on every level, in
                           units of base_grid cells. False: offsets per (image, head, level, point) in cells of their
                           own level, as in Deformable DETR (and its ring initialisation)
    base_grid              int or (H, W): the grid whose cells measure shared offsets; default: the first level.
                           Official: 16 (the ViT patch grid) for the LLM, the skip's own (h, w) for the U-Net.
    """

    def __init__(self, query_dim, value_dim, n_heads, n_levels, n_points, head_dim=None, out_dim=None,
                 offset_init=3.0, max_images=None, null_slot=True, shared_offsets=True, base_grid=None):
        super().__init__()
        self.n_heads, self.n_levels, self.n_points = n_heads, n_levels, n_points
        self.head_dim = head_dim or value_dim // n_heads
        self.offset_init, self.max_images = offset_init, max_images
        self.null_slot, self.shared_offsets = null_slot, shared_offsets
        self.base_grid = (base_grid, base_grid) if isinstance(base_grid, int) else base_grid
        offset_levels = 1 if shared_offsets else n_levels
        if max_images is not None:
            self.query_proj = nn.Linear(query_dim, query_dim)              # per-image query = Linear(q) + E[relpos]
            self.image_embed = nn.Embedding(max_images + 1, query_dim)     # row 0 = invisible (never attended)
        self.sampling_offsets = nn.Linear(query_dim, n_heads * offset_levels * n_points * 2)
        self.attention_weights = nn.Linear(query_dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(value_dim, n_heads * self.head_dim)
        self.output_proj = nn.Linear(n_heads * self.head_dim, out_dim or query_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        M, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)  # offsets start independent of the query
        if self.shared_offsets:  # MMFS: random offsets within +-offset_init base-grid cells
            nn.init.uniform_(self.sampling_offsets.bias, -self.offset_init, self.offset_init)
        else:  # Deformable DETR: head m looks along angle 2*pi*m/M, point p at p+1 cells (on a square ring)
            theta = torch.arange(M) * (2 * torch.pi / M)
            ring = torch.stack([theta.cos(), theta.sin()], -1)
            ring = ring / ring.abs().amax(-1, keepdim=True)                             # (M, 2)
            bias = ring[:, None, None, :] * torch.arange(1, P + 1)[None, None, :, None]  # (M, 1, P, 2)
            self.sampling_offsets.bias.copy_(bias.expand(M, L, P, 2).flatten())
            nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        if self.max_images is not None:
            nn.init.zeros_(self.query_proj.bias)
            nn.init.trunc_normal_(self.image_embed.weight, std=0.02)

    def project_values(self, value):
        """[..., value_dim] image features -> [..., n_heads*head_dim], the values MMFS samples from. Projection is
        per position, so an image's projection does not depend on the other images or the queries: decoding
        projects each image once and passes the result to every later call with value_projected=True."""
        return self.value_proj(value)

    def forward(self, query, reference_points, value, spatial_shapes, visible=None, value_projected=False):
        """query [B, Q, query_dim]; reference_points [B, Q, 2] or [Q, 2], (x, y) in [0, 1];
        value [B, N, S, value_dim], each image's levels flattened and concatenated (S = sum H_l*W_l), or with
        value_projected=True already project_values(value) [B, N, S, n_heads*head_dim];
        spatial_shapes [L, 2] (H, W) of one image's levels; visible [B, Q, N] bool (None: all visible; without
        the null key every query must see some image). Returns [B, Q, out_dim]."""
        B, Q, _ = query.shape
        N, S = value.shape[1:3]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
        if spatial_shapes.shape != (L, 2):
            raise ValueError(f"MMFS: expected spatial_shapes [{L}, 2], got {list(spatial_shapes.shape)}")
        v = value if value_projected else self.project_values(value)
        v = v.reshape(B, N, S, M, self.head_dim)
        ref = reference_points.expand(B, Q, 2)
        if visible is not None and not bool(visible.all()):
            return self._visible_images(query, ref, v, spatial_shapes, visible.expand(B, Q, N))

        # Every query sees every image (ViT-Adapter, U-Net): fold the images into the level axis (image n, level l
        # -> level n*L + l), which makes multi-image attention plain multi-scale deformable attention over N*L levels.
        offsets, logits = self._heads(query, torch.arange(N, 0, -1, device=query.device))  # last image: recency 1
        loc = self._locations(offsets, ref[:, :, None], spatial_shapes)       # (B, Q, N or 1, M, Lo, P, 2)
        loc = loc.expand(B, Q, N, M, L, P, 2).transpose(2, 3).reshape(B, Q, M, N * L, P, 2)
        weights = self._softmax(logits.expand(B, Q, N, -1)).view(B, Q, M, N * L, P)
        shapes = spatial_shapes.repeat(N, 1)                                    # (N*L, 2)
        return self.output_proj(deform_attn(v.view(B, N * S, M, -1), shapes, level_starts(shapes), loc, weights))

    def _visible_images(self, query, ref, v, spatial_shapes, visible):
        """Each token samples only the images it sees (in packed rows: not the other documents' images, nor the
        images after it), so the work scales with the images a token sees, not with the images of its row.
        Heads and softmax run on each token's K slots (slot k: its (k+1)-th most recent visible image, K = the most
        images a token sees; slots beyond its own images get -inf); the op then samples one (token, image) pair
        per query. -> [B, Q, out_dim]"""
        B, Q, N = visible.shape
        M, L = self.n_heads, self.n_levels
        count = visible.sum(-1).view(B * Q)                                     # images each token sees
        sees = count > 0
        tokens = sees.nonzero()[:, 0]                                           # (T,) the tokens that see some
        row = sees.cumsum(0) * sees                      # token -> 1 + its index in `tokens`; 0: it sees none
        b, q, n = visible.nonzero(as_tuple=True)                                # (pairs,) token by token
        if not len(b):  # nobody sees an image (and the op would get no query): every token reads the null key
            return self.output_proj(v.new_zeros(1, M * self.head_dim)).expand(B, Q, -1)
        token, slot = row[b * Q + q] - 1, image_recency(visible)[b, q, n] - 1  # pair -> index in `tokens`, slot
        K = int(count.max())
        offsets, logits = self._heads(query.flatten(0, 1)[tokens][None], torch.arange(1, K + 1, device=query.device))
        loc = self._locations(offsets, ref.reshape(B * Q, 2)[tokens][None, :, None], spatial_shapes)
        empty = torch.arange(K, device=count.device) >= count[tokens][:, None]  # (T, K)
        weights = self._softmax(logits.expand(-1, -1, K, -1).masked_fill(empty[None, :, :, None], float("-inf")))
        loc = loc.expand(-1, -1, K, -1, -1, -1, -1)[0, token, slot].expand(-1, -1, L, -1, -1)  # (pairs, M, L, P, 2)
        weights = weights[0, token, :, slot]                                    # (pairs, M, L, P)
        out = deform_attn(*image_atlas(v.flatten(0, 1), spatial_shapes, b * N + n, loc, weights))[0]  # (pairs, M*D)
        # sum each token's pairs; row 0 stays zero: a token that sees no image reads only the null key
        out = out.new_zeros(len(tokens) + 1, out.shape[-1]).index_add(0, token + 1, out)
        return self.output_proj(out)[row].view(B, Q, -1)

    def _heads(self, query, relpos):
        """Offsets [B, Q, N, M*Lo*P*2] and attention logits [B, Q, N, M*L*P] of every (query [B, Q, query_dim],
        image), relpos [N]: the image's recency (1 = the most recent image the query sees); at fp32 or better, so
        that locations and softmax stay precise when the module runs in bf16 / under autocast. Without the
        image-index embedding every image gets the same: [B, Q, 1, ...].
        Per-image query (docs/official.md): q_n = query_proj(q) + E[relpos_n]. The heads are linear, so
        head(q_n) = head(query_proj(q)) + W_head E[relpos_n]: apply them to each token once and to the (tiny)
        embedding table once, instead of materialising a [B, Q, N, query_dim] tensor."""
        heads = (self.sampling_offsets, self.attention_weights)
        if self.max_images is None:
            out = [h(query)[:, :, None] for h in heads]
        else:
            if relpos.numel() and int(relpos.max()) > self.max_images:  # a row may hold more, a token not see more
                raise ValueError(f"MMFS: a token sees {int(relpos.max())} images but max_images={self.max_images}")
            q, E = self.query_proj(query), self.image_embed.weight
            out = [h(q)[:, :, None] + F.embedding(relpos, E @ h.weight.T) for h in heads]
        fp = torch.promote_types(out[0].dtype, torch.float32)
        return [o.to(fp) for o in out]

    def _locations(self, offsets, ref, spatial_shapes):
        """offsets [..., M*Lo*P*2], reference points [..., 2] -> sampling locations [..., M, Lo, P, 2]:
        reference point + offset / cells, per (head, level, point); Lo = 1 (shared offsets: the same on every
        level) or L."""
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = offsets.unflatten(-1, (M, 1 if self.shared_offsets else L, P, 2))
        if self.shared_offsets:  # one point for all levels, measured in base-grid cells
            h, w = self.base_grid or spatial_shapes[0].tolist()
            cells = offsets.new_tensor([w, h])
        else:                    # measured in cells of each level
            cells = spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :]         # (L, 1, 2) as (W, H)
        cells = cells.expand(offsets.shape[-4:]).contiguous()  # as in image_atlas: no short broadcast last axis
        return ref.to(offsets.dtype)[..., None, None, None, :] + offsets / cells

    def _softmax(self, logits):
        """logits [..., N, M*L*P] of each (query, image) -> weights [..., M, N, L, P]: one softmax per head over all
        (image, level, point) and the null key. The official code appends N*L null slots of logit -log(N*L) and zero
        value; together they weigh exactly as much as the single zero-value key of logit 0 used here."""
        *lead, N, _ = logits.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        # The softmax axis goes first, (N*L*P, *lead, M), and the result comes back as a view: torch's CPU softmax
        # over a short last axis (9 entries in the tiny U-Net) is much slower than over a first axis, where it is
        # vectorised along the many (token, head) behind it. Same values (the sum's order may differ by an ulp).
        logits = logits.unflatten(-1, (M, L * P)).movedim((-3, -1), (0, 1)).reshape(N * L * P, *lead, M)
        if self.null_slot:
            logits = torch.cat([logits, logits.new_zeros(1, *lead, M)])
        weights = logits.softmax(0)[:N * L * P]                 # the null key's value is zero: drop it
        return weights.view(N, L, P, *lead, M).movedim((0, 1, 2), (-3, -2, -1))
