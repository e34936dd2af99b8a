"""MMFS, the Multi-Modal Feature Synchronizer of MM-Interleaved (paper Sec. 3.2, eq. 4), and the deformable attention
op it is built on.

A query token (an LLM hidden state, a U-Net pixel, a ViT token) reads fine image detail straight from the multi-scale
feature maps of the images before it. For every image it predicts a few sampling points around a reference point and
one logit per point; the output is the softmax-weighted sum of the features sampled (bilinearly) at those points. The
softmax runs jointly over all images and levels, together with a "null" key of zero value, so a token can spread its
attention over several images, or read nothing at all.

    deform_attn            the op, in Deformable-DETR layouts; the CUDA kernel of kernels/ on GPU tensors
    deform_attn_reference  the same op in pure torch (F.grid_sample); the definition the kernel is tested against
    MMFS                   the module; its three uses in MM-Interleaved (official.md):
      LLM      MMFS(5120, 1024, n_heads=16, n_levels=3, n_points=8, head_dim=64, offset_init=3, max_images=50,
                    base_grid=16)   values: levels 32/16/8 of every image, reference point (0.5, 0.5)
      U-Net    MMFS(C_skip, 1024, n_heads=16, n_levels=4, n_points=8, head_dim=64, offset_init=1, max_images=1,
                    base_grid=(h, w) of the skip)   values: 4 adapter levels 64/32/16/8 of the previous image (N=1;
                    visible False where there is none), reference points = pixel_centres(h, w) of the skip
      Adapter  MMFS(1024, 1024, n_heads=16, n_levels=3, n_points=4, head_dim=32, max_images=None, null_slot=False,
                    shared_offsets=False)   plain single-image MSDeformAttn of Deformable DETR / ViT-Adapter
"""
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
    shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
    starts = level_start_index.tolist()
    if len(shapes) != L or S != sum(h * w for h, w in shapes):
        raise ValueError(f"deform_attn: value has {S} positions and locations {L} levels, "
                         f"but spatial_shapes is {shapes}")
    out_dtype = value.dtype
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # never sample at bf16-rounded locations
    value, weights = value.to(dtype), attention_weights.to(dtype)
    grid = 2 * sampling_locations.to(dtype) - 1                         # grid_sample's [-1, 1] convention
    groups = {}                                                         # (H, W) -> levels of that shape
    for l, hw in enumerate(shapes):
        groups.setdefault(hw, []).append(l)

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
    a = weights[:, :, :, levels].permute(0, 2, 3, 1, 4).reshape(B * M * k, 1, Q, P)
    sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M*k, D, Q, P)
    weighted = sampled * a if sampled.requires_grad else sampled.mul_(a)  # in place when autograd is off
    return weighted.sum(-1).view(B, M, k, D, Q).sum(2)


_kernel_failed = False  # set once the CUDA kernel could not be imported or built: we stop trying


def _wants_kernel(value):
    return value.is_cuda and os.environ.get("MMI_DEFORM_REFERENCE") != "1" and not _kernel_failed


def _kernel_unavailable(err):
    global _kernel_failed
    _kernel_failed = True
    warnings.warn(f"mmfs: CUDA deformable-attention kernel unavailable ({err}); using the pure-torch reference "
                  "(slower, more memory)", stacklevel=3)


def deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op of deform_attn_reference (same arguments and result). CUDA tensors run the kernel of kernels/ unless
    MMI_DEFORM_REFERENCE=1; if that kernel cannot be imported or built we warn once and use the reference."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _wants_kernel(value):
        try:
            import kernels  # lazily: CPU users never touch the CUDA build
        except ImportError as e:
            _kernel_unavailable(e)
        else:
            try:
                return kernels.cuda_deform_attn(*args)
            except kernels.KernelUnavailable as e:
                _kernel_unavailable(e)
    return deform_attn_reference(*args)


# -----------------------------------------------------------------------------
# The module


def image_recency(visible):
    """visible [..., N] bool (images ordered by position) -> [..., N] long: the most recent visible image is 1, the
    visible one before it 2, and so on; invisible images are 0. The index into MMFS's image-index embedding."""
    v = visible.long()
    return (v.sum(-1, keepdim=True) - v.cumsum(-1) + 1) * v  # visible images at or after n, for visible n


class MMFS(nn.Module):
    """Multi-image multi-scale deformable attention with a null key (official.md, "MMFS inside the LLM").

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
        visible = torch.ones(B, Q, N, dtype=torch.bool, device=query.device) if visible is None \
            else visible.expand(B, Q, N)

        # Values: project every image, then fold images into the level axis (image n, level l -> level n*L + l),
        # which makes multi-image attention plain multi-scale deformable attention over N*L levels.
        v = value if value_projected else self.project_values(value)
        v = v.reshape(B, N * S, M, self.head_dim)
        shapes = spatial_shapes.repeat(N, 1)                                      # (N*L, 2)

        offsets, logits = self._heads(query, visible)  # (B, Q, N or 1, M*Lo*P*2), (B, Q, N or 1, M*L*P)
        fp = torch.promote_types(offsets.dtype, torch.float32)  # locations and softmax at fp32 or better, also
        offsets, logits = offsets.to(fp), logits.to(fp)           # when the module runs in bf16 / under autocast

        # Sampling locations = reference point + offset / cells, per (image, head, level, point).
        Lo = 1 if self.shared_offsets else L
        offsets = offsets.unflatten(-1, (M, Lo, P, 2))                            # (B, Q, N|1, M, Lo, P, 2)
        if self.shared_offsets:  # one point for all levels, measured in base-grid cells
            h, w = self.base_grid or spatial_shapes[0].tolist()
            cells = offsets.new_tensor([w, h])
        else:                    # measured in cells of each level
            cells = spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :]         # (L, 1, 2) as (W, H)
        ref = reference_points.to(offsets.dtype).expand(B, Q, 2)
        loc = ref[:, :, None, None, None, None, :] + offsets / cells
        loc = loc.expand(B, Q, N, M, L, P, 2).transpose(2, 3).reshape(B, Q, M, N * L, P, 2)

        # Attention: invisible images get -inf; one softmax per head over all (image, level, point) and the null key.
        # The official code appends N*L null slots of logit -log(N*L) and zero value; together they weigh exactly
        # as much as the single zero-value key of logit 0 used here.
        logits = logits.unflatten(-1, (M, L * P)).expand(B, Q, N, M, L * P)
        logits = logits.masked_fill(~visible[..., None, None], float("-inf"))
        logits = logits.transpose(2, 3).reshape(B, Q, M, N * L * P)
        if self.null_slot:
            logits = torch.cat([logits, logits.new_zeros(B, Q, M, 1)], -1)
        weights = logits.softmax(-1)[..., :N * L * P].view(B, Q, M, N * L, P)  # the null key's value is zero: drop it

        out = deform_attn(v, shapes, level_starts(shapes), loc, weights)        # (B, Q, M*head_dim)
        return self.output_proj(out)

    def _heads(self, query, visible):
        """Offsets and attention logits of every (query, image).
        Per-image query (official.md): q_n = query_proj(q) + E[relpos_n]. The heads are linear, so
        head(q_n) = head(query_proj(q)) + W_head E[relpos_n]: apply them to each token once and to the (tiny)
        embedding table once, instead of materialising a [B, Q, N, query_dim] tensor."""
        if self.max_images is None:  # no image-index embedding: every image gets the same offsets and logits
            return self.sampling_offsets(query)[:, :, None], self.attention_weights(query)[:, :, None]
        relpos = image_recency(visible)                                           # (B, Q, N)
        if relpos.numel() and int(relpos.max()) > self.max_images:  # a packed row may hold more, a token not see more
            raise ValueError(f"MMFS: a token sees {int(relpos.max())} images but max_images={self.max_images}")
        q = self.query_proj(query)
        E = self.image_embed.weight
        offsets = self.sampling_offsets(q)[:, :, None] + F.embedding(relpos, E @ self.sampling_offsets.weight.T)
        logits = self.attention_weights(q)[:, :, None] + F.embedding(relpos, E @ self.attention_weights.weight.T)
        return offsets, logits
