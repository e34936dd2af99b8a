"""
The CLIP vision transformer (ViT-L/14 in MM-Interleaved) and the ViT-Adapter that turns it into multi-scale maps.

    VisionTransformer      CLIP's vision tower: patch conv, class token, learned positions, pre_layrnorm, pre-LN
                           blocks with quick_gelu. Returns the last hidden state (no post-LayerNorm), as
                           transformers' CLIPVisionModel does. Attribute names mirror the checkpoint keys
                           (`vision_model.` + ...), so loading is one strict loop with no key map.
    clip_preprocess        Pillow: bicubic resize of the short side, centre crop, CLIP mean/std.
    ViTAdapter             spatial-prior conv stem + interaction blocks (deformable attention from mmfs.py) around
                           contiguous ranges of the ViT's layers -> ViT tokens and 4 feature maps (docs/official.md).
    sincos_2d              fixed 2D sine-cosine position table (rows first, as every official table);
    sincos_2d_resized      one stored square table resized bicubically to another grid: the official way of giving
                           the adapter levels and the U-Net's MMFS taps their positions.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfs import MMFS, pixel_centres
from weights import CheckpointError, load_strict, open_checkpoint, read_json, recompute_in_backward, weight_files

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:  # defaults: openai/clip-vit-large-patch14 (from_hf always reads the file's values)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, config: dict, source="config.json") -> "CLIPVisionConfig":
        """A full CLIPModel config (fields under `vision_config`) or a vision-only one (fields at the top level)."""
        d = config.get("vision_config", config)
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                    "image_size", "layer_norm_eps")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"{source}: vision config lacks {', '.join(missing)}")
        cfg = cls(**{k: d[k] for k in required}, num_channels=d.get("num_channels", 3),
                  hidden_act=d.get("hidden_act", "quick_gelu"))
        if cfg.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: unsupported hidden_act {cfg.hidden_act!r}")
        return cfg


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # CLIP's cheap GELU approximation


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}

# -----------------------------------------------------------------------------
# CLIP vision transformer (source: OpenAI CLIP / transformers CLIPVisionModel, written from the key layout)


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D, P = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // P
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)  # CLIP's init; from_pretrained overwrites it
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, P, stride=P, bias=False)
        self.position_embedding = nn.Embedding(1 + self.grid**2, D)

    def positions(self, gh, gw):
        """[1 + gh*gw, D]; the patch part resized bicubically for another grid, the class position kept."""
        pos = self.position_embedding.weight
        if (gh, gw) == (self.grid, self.grid):
            return pos
        g, D = self.grid, pos.shape[1]
        patch = pos[1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(gh * gw, D)])

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        B, D, gh, gw = x.shape
        x = torch.cat([self.class_embedding.expand(B, 1, D), x.flatten(2).transpose(1, 2)], 1)  # (B, 1+N, D)
        return x + self.positions(gh, gw)


class Attention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        h = self.fc1(x)
        if self.act is quick_gelu and not h.requires_grad:  # inference: in place, two fewer [B, T, 4D] tensors
            return self.fc2(h.mul_(torch.sigmoid_(h * 1.702)))
        return self.fc2(self.act(h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # only for pooled(); not in forward
        self.gradient_checkpointing = False  # recompute each block in backward (training with grad only)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    def embed(self, pixels):
        """CLIP-normalised pixels [B, C, H, W] -> hidden_states[0] = pre_layrnorm(embeddings) [B, 1+N, D]."""
        return self.pre_layrnorm(self.embeddings(pixels))

    def run(self, layer, x):
        """One block; wherever blocks run (here and in the adapter), so gradient_checkpointing covers all uses."""
        return recompute_in_backward(self, layer, x)

    def forward(self, pixels, return_hidden_states=False):
        """-> last hidden state [B, 1+N, D], or (last, hidden_states) with len(hidden_states) = layers + 1."""
        x = self.embed(pixels)
        hidden = [x]
        for layer in self.blocks:
            x = self.run(layer, x)
            hidden.append(x)
        return (x, tuple(hidden)) if return_hidden_states else x

    def pooled(self, last_hidden):
        """CLIP's pooled output: post_layernorm of the class token [B, D]."""
        return self.post_layernorm(last_hidden[:, 0])

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "VisionTransformer":
        """A CLIP folder: config.json (CLIPModel or vision-only) + model.safetensors or pytorch_model.bin.
        dtype None keeps the checkpoint's floating dtype."""
        path = Path(path)
        cfg = CLIPVisionConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
        stem = "model" if any((path / f"model{e}").is_file() for e in (".safetensors", ".safetensors.index.json")) \
            else "pytorch_model"
        files = weight_files(path, stem)
        ckpt = open_checkpoint(files)
        source = ", ".join(map(str, files))

        # The vision tower's keys start with `vision_model.` in the official files (transformers 5.x writes a
        # vision-only model without it). The text tower, projections and position-id buffers are not ours.
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in ckpt) else ""
        ignored = ("text_model.", "visual_projection.", "text_projection.", "logit_scale") if prefix else ()
        keys = [k for k in ckpt if not k.startswith(ignored) and not k.endswith("position_ids")]
        with torch.device("meta"):
            model = cls(cfg)
        root = model
        if prefix:  # load through a holder whose state-dict keys read exactly as in the file (so do error messages)
            root = nn.Module()
            root.vision_model = model
        if dtype is None:
            probe = prefix + "pre_layrnorm.weight"
            dtype = ckpt[probe].dtype if probe in ckpt else torch.float32
        load_strict(root, {k: functools.partial(ckpt.__getitem__, k) for k in keys}, source, dtype=dtype)
        return model.eval()


# -----------------------------------------------------------------------------
# Preprocessing


def normalize(x01):
    """Images in [0, 1], [..., 3, H, W] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, device=x01.device, dtype=x01.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x01.device, dtype=x01.dtype).view(3, 1, 1)
    return (x01 - mean) / std


def to_tensor01(pil_image):
    """PIL image -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def clip_preprocess(pil_image, size=224):
    """CLIP's preprocessing: bicubic resize of the short side to `size`, centre crop, normalise -> [3, size, size]."""
    from PIL import Image

    img = pil_image.convert("RGB")
    w, h = img.size
    short = min(w, h)
    nw, nh = int(size * w / short), int(size * h / short)  # the long side truncated, as transformers does
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return normalize(to_tensor01(img))


def resize01(x, size):
    """Resize images in [0, 1] [B, 3, H, W] to size x size (bicubic, antialiased when shrinking); no-op if equal."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


# -----------------------------------------------------------------------------
# Fixed 2D sine-cosine positions


def sincos_1d(n, dim, device=None, dtype=torch.float32):
    """Fixed 1D sin-cos embedding of positions 0..n-1: [n, dim] (first half sin, second half cos)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=device, dtype=torch.float64) / (dim // 2))
    angle = torch.arange(n, device=device, dtype=torch.float64)[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], 1).to(dtype)


@functools.lru_cache(maxsize=16)
def _sincos_table(h, w, dim):
    # device="cpu" explicitly: a call under `with torch.device("meta")` must not cache meta tensors for everyone
    f64 = dict(dtype=torch.float64, device="cpu")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, **f64) / (dim // 4))  # (dim/4,)
    y, x = torch.meshgrid(torch.arange(h, **f64), torch.arange(w, **f64), indexing="ij")

    def encode(pos):  # (h*w,) -> (h*w, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], 1)

    return torch.cat([encode(y), encode(x)], 1)  # (h*w, dim), float64


def sincos_2d(h, w, dim, device=None, dtype=torch.float32):
    """Fixed 2D sin-cos position embedding of an h x w grid, row-major tokens: [h*w, dim].
    The first half of the channels encodes the row, the second half the column (official order; MAE's is the
    reverse), each as [sin, cos] of position * 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
    Computed in float64, returned as a fresh tensor."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    return _sincos_table(h, w, dim).to(device=device, dtype=dtype, copy=True)


@functools.lru_cache(maxsize=32)
def _resized_table(size, h, w, dim):
    table = _sincos_table(size, size, dim).T.reshape(1, dim, size, size)
    return F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False).reshape(dim, h * w).T


def sincos_2d_resized(table_size, h, w, dim, device=None, dtype=torch.float32):
    """The official position table of an h x w map: ONE table_size x table_size sin-cos table resized bicubically
    (align_corners=False) to h x w, not a fresh table computed at h x w: [h*w, dim]. Official uses: the adapter
    levels (table at the ViT grid, 16) and the U-Net MMFS taps (table at the latent size, 64 at 512 px)."""
    if (h, w) == (table_size, table_size):
        return sincos_2d(h, w, dim, device, dtype)
    if dim % 4:
        raise ValueError(f"sincos_2d_resized: dim must be a multiple of 4, got {dim}")
    return _resized_table(table_size, h, w, dim).to(device=device, dtype=dtype, copy=True)


# -----------------------------------------------------------------------------
# ViT-Adapter (Chen et al. 2023, as used by MM-Interleaved; docs/official.md "Multi-scale image features")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm_relu(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), LayerNorm2d(cout, eps=1e-6), nn.ReLU())


class SpatialPrior(nn.Module):
    """A small conv stem giving the local detail a ViT lacks: maps at strides 4, 8, 16, 32, projected to `dim`."""

    def __init__(self, dim, c=64):
        super().__init__()
        self.stem = nn.Sequential(conv_norm_relu(3, c, 2), conv_norm_relu(c, c, 1), conv_norm_relu(c, c, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = conv_norm_relu(c, 2 * c, 2)
        self.conv3 = conv_norm_relu(2 * c, 4 * c, 2)
        self.conv4 = conv_norm_relu(4 * c, 4 * c, 2)
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Conv2d(cin, dim, 1) for cin in (c, 2 * c, 4 * c, 4 * c))

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


def deformable(dim, n_heads, n_levels, n_points, ratio):
    """Plain single-image multi-scale deformable attention (Deformable DETR's MSDeformAttn) via MMFS."""
    return MMFS(dim, dim, n_heads, n_levels, n_points, head_dim=int(dim * ratio) // n_heads,
                max_images=None, null_slot=False, shared_offsets=False)


def tokens_to_map(t, hw):
    return t.transpose(1, 2).unflatten(2, hw)  # (B, h*w, C) -> (B, C, h, w)


EPS = 1e-5  # the interaction blocks' LayerNorms are plain nn.LayerNorm in the official adapter (the SPM's: 1e-6)


class Injector(nn.Module):
    """ViT patch tokens read the spatial-prior levels c2..c4. gamma starts at 0: the ViT is unchanged at init."""

    def __init__(self, dim, n_heads, n_points, ratio):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=EPS), nn.LayerNorm(dim, eps=EPS)
        self.attn = deformable(dim, n_heads, 3, n_points, ratio)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x, ref, c, c_shapes):
        # the adapter may run in another dtype than a frozen half-precision ViT: compute in c's, add in x's
        delta = self.gamma * self.attn(self.query_norm(x.to(c.dtype)), ref, self.feat_norm(c)[:, None], c_shapes)
        return x + delta.to(x.dtype)


class ConvFFN(nn.Module):
    """MLP with a depthwise 3x3 conv in the middle, applied to each level's map separately."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, shapes):
        x = self.fc1(x)
        parts = x.split([h * w for h, w in shapes], 1)
        x = torch.cat([self.dwconv(tokens_to_map(p, hw)).flatten(2).transpose(1, 2) for p, hw in zip(parts, shapes)], 1)
        return self.fc2(F.gelu(x))


class Extractor(nn.Module):
    """The spatial-prior tokens c2..c4 read the ViT patch tokens (one level), then a conv-FFN."""

    def __init__(self, dim, n_heads, n_points, ratio, cffn_ratio):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=EPS), nn.LayerNorm(dim, eps=EPS)
        self.attn = deformable(dim, n_heads, 1, n_points, ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=EPS)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))

    def forward(self, c, ref, x, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x.to(c.dtype))[:, None], [x_shape])
        return c + self.ffn(self.ffn_norm(c), c_shapes)


class Interaction(nn.Module):
    """inject into the patch tokens -> run a range of ViT layers -> extract into c (+ extra extractors)."""

    def __init__(self, dim, n_heads, n_points, ratio, cffn_ratio, n_extra=0):
        super().__init__()
        self.injector = Injector(dim, n_heads, n_points, ratio)
        self.extractor = Extractor(dim, n_heads, n_points, ratio, cffn_ratio)
        self.extra_extractors = nn.ModuleList(Extractor(dim, n_heads, n_points, ratio, cffn_ratio)
                                              for _ in range(n_extra))

    def forward(self, x, c, vit, layers, grid, c_shapes, vit_ref, c_ref):
        # The class token takes no part in the exchange with the spatial prior; the ViT layers see it as usual.
        x = torch.cat([x[:, :1], self.injector(x[:, 1:], vit_ref, c, c_shapes)], 1)
        for layer in layers:
            x = vit.run(layer, x)
        for extractor in [self.extractor, *self.extra_extractors]:
            c = extractor(c, c_ref, x[:, 1:], grid, c_shapes)
        return x, c


class ViTAdapter(nn.Module):
    """CLIP ViT + ViT-Adapter: images in [0, 1] -> (ViT tokens [B, 1+N, D], maps [c1, c2, c3, c4] [B, D, h_i, w_i]).

    The spatial prior runs at 16 x the ViT's patch grid (256 px for ViT-L/14 at 224), so its stride-16 level c3
    matches the ViT grid and the maps come out at 4x, 2x, 1x, 1/2x the grid (64, 32, 16, 8 officially).
    The ViT's layers are split into n_blocks contiguous ranges ([0-5], [6-11], ... for 24 layers), each wrapped by
    an interaction block; the ViT's own weights stay in self.vit (freeze them as the paper does, or not).
    n_heads None: the ViT's head count (official).
    """

    def __init__(self, vit: VisionTransformer, n_blocks=4, n_heads=None, n_points=4, deform_ratio=0.5,
                 cffn_ratio=0.25, n_extra_extractors=2, spm_channels=64):
        super().__init__()
        cfg = vit.cfg
        D, n = cfg.hidden_size, cfg.num_hidden_layers
        n_heads = n_heads or cfg.num_attention_heads
        self.vit = vit
        self.grid = cfg.image_size // cfg.patch_size
        self.spm_size = 16 * self.grid
        n_blocks = min(n_blocks, n)
        bounds = [i * n // n_blocks for i in range(n_blocks + 1)]
        self.ranges = list(zip(bounds[:-1], bounds[1:]))  # ViT layers wrapped by each interaction
        self.spm = SpatialPrior(D, spm_channels)
        self.level_embed = nn.Parameter(torch.zeros(3, D))  # added to c2, c3, c4; zero-initialised
        self.interactions = nn.ModuleList(
            Interaction(D, n_heads, n_points, deform_ratio, cffn_ratio, n_extra_extractors if i == n_blocks - 1 else 0)
            for i in range(n_blocks))
        self.up = nn.ConvTranspose2d(D, D, 2, 2)  # c2 -> c1 resolution
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The official initialisation: PyTorch's defaults, MSDeformAttn's own, then transformers' CLIP init zeroes
        every Linear bias, the sampling offsets' included (the ring of Deformable DETR is lost: offsets start at 0)."""
        own = [m for name, m in self.named_modules() if name and not name.startswith("vit")]
        for m in own:
            if hasattr(m, "reset_parameters") and not isinstance(m, MMFS):
                m.reset_parameters()
        for m in own:  # pre-order: an MMFS comes before its Linears
            if isinstance(m, MMFS):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.level_embed)
        for block in self.interactions:
            nn.init.zeros_(block.injector.gamma)

    def positions(self, h, w, device=None, dtype=torch.float32):
        """[D, h, w] the position table of an h x w map: the ViT grid's sin-cos table resized (official)."""
        D = self.vit.cfg.hidden_size
        return sincos_2d_resized(self.grid, h, w, D, device, dtype).T.reshape(D, h, w)

    def forward(self, images01, positions=True):
        """positions: add self.positions to each map (what MMFS reads); False: the adapter's own output."""
        g = self.grid
        x = normalize(resize01(images01, self.vit.cfg.image_size))
        # the spatial prior sees the normalised ViT input resized bilinearly (official)
        spm_in = F.interpolate(x, size=(self.spm_size,) * 2, mode="bilinear", align_corners=False)
        x = self.vit.embed(x)  # (B, 1+g*g, D)
        c1, *cs = self.spm(spm_in.to(self.level_embed.dtype))
        c_shapes = [tuple(m.shape[-2:]) for m in cs]  # c2, c3, c4: (2g, 2g), (g, g), (g/2, g/2)
        c = torch.cat([m.flatten(2).transpose(1, 2) + self.level_embed[i] for i, m in enumerate(cs)], 1)  # (B, S, D)
        vit_ref = pixel_centres(g, g, device=x.device)
        c_ref = torch.cat([pixel_centres(h, w, device=x.device) for h, w in c_shapes])

        xs = []  # the patch tokens after each interaction block, as maps: x1..x4 (B, D, g, g)
        for block, (a, b) in zip(self.interactions, self.ranges):
            x, c = block(x, c, self.vit, self.vit.blocks[a:b], (g, g), c_shapes, vit_ref, c_ref)
            xs.append(tokens_to_map(x[:, 1:], (g, g)).to(c.dtype))

        c2, c3, c4 = (tokens_to_map(t, hw) for t, hw in zip(c.split([h * w for h, w in c_shapes], 1), c_shapes))
        c1 = self.up(c2) + c1
        # level i adds the tokens after interaction block i (official: 4 blocks; fewer blocks spread evenly),
        # bilinearly resized: x1 up 4x, x2 up 2x, x3 as is, x4 down 2x (= a 2x2 average)
        xs = [xs[i * len(xs) // 4] for i in range(4)]
        maps = [m + (xi if xi.shape[-2:] == m.shape[-2:] else
                     F.interpolate(xi, size=m.shape[-2:], mode="bilinear", align_corners=False))
                for m, xi in zip((c1, c2, c3, c4), xs)]
        if positions:
            maps = [m + self.positions(*m.shape[-2:], m.device, m.dtype) for m in maps]
        return x, maps
