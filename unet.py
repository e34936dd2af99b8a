"""
Stable Diffusion 2.x image decoder: the latent U-Net and the KL autoencoder (the schedule: diffusion.py).

Module attribute names mirror the diffusers checkpoint keys (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`),
so a diffusers folder loads with a strict name-for-name loop; original single-file checkpoints (`model.diffusion_model.*`,
`first_stage_model.*`) are renamed to those keys on the fly. MMFS hooks in through `UNet.down` / `UNet.up`: the caller
may add a residual to every skip tensor and to the mid-block output (ControlNet style).

    unet = UNet.from_pretrained("stable-diffusion-2-1-base")          # pipeline root, unet/ folder, or .safetensors
    vae = AutoencoderKL.from_pretrained("stable-diffusion-2-1-base")
    sched = diffusion.NoiseSchedule.from_pretrained("stable-diffusion-2-1-base")
    x = sched.sample(lambda x, t: unet(x, t, context), torch.randn(1, 4, 64, 64), steps=50)
    image = vae.decode(x / vae.scaling_factor)                        # [-1, 1]
"""
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weights import (CheckpointError, component_folder, load_strict, open_checkpoint, read_json, recompute_in_backward,
                     weight_files)

# -----------------------------------------------------------------------------------------------------------------
# building blocks (shared by the U-Net and the autoencoder)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time embedding added in between (diffusers ResnetBlock2D)."""

    def __init__(self, cin, cout, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, c, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE encoder pads right/bottom only, then a stride-2 conv without padding
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        # an explicit size lets odd-sized skips line up (e.g. 96 px latents at 4 levels)
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention over tokens; `context` switches it to cross-attention. q/k/v bias only in the VAE."""

    def __init__(self, dim, heads, context_dim=None, bias=False, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key `to_out.0` (diffusers keeps a dropout at .1)

    def forward(self, x, context=None):  # x (B, N, C), context (B, T, Cc)
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, H, N, D)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast and q.dtype != torch.float32:  # SD 2.1-768 overflows fp16 in q@k^T
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])  # keys net.0, net.2

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, upcast):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, upcast=upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks on the H*W tokens, project out, residual."""

    def __init__(self, c, heads, context_dim, depth, groups, linear, upcast):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(c, heads, context_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Block(nn.Module):
    """One down, mid or up block: lists `resnets`, `attentions` and `downsamplers`/`upsamplers` as diffusers keys them."""

    def __init__(self, resnets, attentions=(), downsample=None, upsample=None):
        super().__init__()
        self.resnets, self.attentions = nn.ModuleList(resnets), nn.ModuleList(attentions)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])


# -----------------------------------------------------------------------------------------------------------------
# U-Net

# diffusers config fields we do not implement, with the only value we accept
_UNET_FIXED = dict(act_fn="silu", center_input_sample=False, class_embed_type=None, addition_embed_type=None,
                   only_cross_attention=False, dual_cross_attention=False, resnet_time_scale_shift="default",
                   time_embedding_type="positional", mid_block_type="UNetMidBlock2DCrossAttn", conv_in_kernel=3,
                   conv_out_kernel=3, encoder_hid_dim=None, time_cond_proj_dim=None, num_class_embeds=None,
                   attention_type="default", downsample_padding=1, mid_block_scale_factor=1)


def config_from_dict(cls, d, fixed, what, source):
    """A diffusers config.json dict -> the dataclass cls (lists as tuples, keys it does not know ignored), after
    checking the options mmi implements one way only (fixed: {option: the only supported value})."""
    for k, ok in fixed.items():
        if k in d and d[k] != ok:
            raise CheckpointError(f"{source}: unsupported {what} option {k}={d[k]!r} (only {ok!r})")
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


@dataclass
class UNetConfig:
    """Field names and meanings of diffusers' unet/config.json; defaults are SD 2.1-base."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    attention_head_dim: int | tuple = (5, 10, 20, 20)  # SD 2 stores the NUMBER of heads per level here (head dim 64)
    num_attention_heads: int | tuple | None = None  # newer configs: takes precedence when set
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int | tuple = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: dict, source="config"):
        for kind in [*d.get("down_block_types", ()), *d.get("up_block_types", ())]:
            if kind not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise CheckpointError(f"{source}: unsupported U-Net block type {kind!r}")
        return config_from_dict(cls, d, _UNET_FIXED, "U-Net", source)

    def per_level(self, value):
        n = len(self.block_out_channels)
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0):  # t (B,) -> (B, dim), sinusoidal, float32
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet(nn.Module):
    """The SD 2.x conditional U-Net (diffusers UNet2DConditionModel names). unet(x, t, context) -> prediction."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        heads = cfg.per_level(cfg.num_attention_heads or cfg.attention_head_dim)
        depth = cfg.per_level(cfg.transformer_layers_per_block)
        G, eps, temb = cfg.norm_num_groups, cfg.norm_eps, 4 * chs[0]
        assert len(cfg.down_block_types) == len(cfg.up_block_types) == n, "one down and one up block per level"

        def attn(c, level):
            return Transformer2DModel(c, heads[level], cfg.cross_attention_dim, depth[level], G,
                                      cfg.use_linear_projection, cfg.upcast_attention)

        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        skip_chs, strides = [chs[0]], [1]  # channels and stride of every tensor the down path hands to the up path
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            cross = kind.startswith("CrossAttn")
            resnets, attns = [], []
            for j in range(cfg.layers_per_block):
                resnets.append(ResnetBlock2D(chs[i - 1] if j == 0 and i > 0 else chs[i], chs[i], temb, G, eps))
                attns += [attn(chs[i], i)] if cross else []
                skip_chs.append(chs[i])
                strides.append(2 ** i)
            down = Downsample2D(chs[i]) if i < n - 1 else None
            skip_chs += [chs[i]] if down else []
            strides += [2 ** (i + 1)] if down else []
            self.down_blocks.append(Block(resnets, attns, downsample=down))
        c = chs[-1]
        # (channels, stride) of what `down` returns: each skip, then the mid block (where MMFS taps in)
        self.taps = list(zip(skip_chs, strides)) + [(c, 2 ** (n - 1))]
        self.mid_block = Block([ResnetBlock2D(c, c, temb, G, eps), ResnetBlock2D(c, c, temb, G, eps)], [attn(c, n - 1)])
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            cout, cross = chs[level], kind.startswith("CrossAttn")
            resnets, attns = [], []
            for j in range(cfg.layers_per_block + 1):
                resnets.append(ResnetBlock2D(c + skip_chs.pop(), cout, temb, G, eps))
                attns += [attn(cout, level)] if cross else []
                c = cout
            self.up_blocks.append(Block(resnets, attns, upsample=Upsample2D(cout) if i < n - 1 else None))
        self.conv_norm_out = nn.GroupNorm(G, chs[0], eps=eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # recompute resnets/transformers in backward (full-size training)

    def _run(self, module, *args):
        return recompute_in_backward(self, module, *args)

    def down(self, x, t, context):
        """x (B, Cin, H, W), t (B,) or scalar -> (skips: list of (B, C_i, H_i, W_i), mid (B, C, h, w), emb (B, 4*C0))."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, x, emb)
                if len(block.attentions):
                    x = self._run(block.attentions[j], x, context)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self._run(self.mid_block.resnets[0], x, emb)
        x = self._run(self.mid_block.attentions[0], x, context)
        x = self._run(self.mid_block.resnets[1], x, emb)
        return skips, x, emb

    def up(self, skips, mid, emb, context):
        """Consumes the skips (last first) on the way up; returns the prediction (B, Cout, H, W)."""
        skips, x = list(skips), mid
        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, torch.cat([x, skips.pop()], dim=1), emb)
                if len(block.attentions):
                    x = self._run(block.attentions[j], x, context)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, x, t, context):  # taps (MMFS, ControlNet) add to the skips between down() and up()
        return self.up(*self.down(x, t, context), context)

    @classmethod
    def from_pretrained(cls, path, dtype=None, config: UNetConfig | None = None):
        """A diffusers unet/ folder, a pipeline root, or an original single-file checkpoint (then the architecture
        is inferred from tensor shapes with SD 2's head dimension 64, unless `config` is given)."""
        path = Path(path)
        if path.is_dir():
            path = component_folder(path, "unet")
            cfg = config or UNetConfig.from_dict(read_json(path / "config.json"), path / "config.json")
            tensors = open_checkpoint(weight_files(path, "diffusion_pytorch_model"))
        else:
            ckpt = open_checkpoint([path])
            if "conv_in.weight" in ckpt:  # diffusers names in one file, e.g. unet/diffusion_pytorch_model.fp16.safetensors
                tensors = _renamed(ckpt, "", lambda k: k, path)
            else:
                lpb = _original_layers_per_block(ckpt, "model.diffusion_model.")
                tensors = _renamed(ckpt, "model.diffusion_model.", lambda k: _unet_key(k, lpb), path)
            cfg = config or _sibling_config(path, ckpt, "conv_in.weight", UNetConfig) or _infer_unet_config(tensors)
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, tensors, str(path), dtype).eval()


# -----------------------------------------------------------------------------------------------------------------
# KL autoencoder


@dataclass
class VAEConfig:
    """Fields of diffusers' vae/config.json; defaults are the SD 2.x autoencoder."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @classmethod
    def from_dict(cls, d: dict, source="config"):
        fixed = dict(act_fn="silu", shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
                     mid_block_add_attention=True)
        return config_from_dict(cls, d, fixed, "autoencoder", source)


def _vae_mid(c, G):
    return Block([ResnetBlock2D(c, c, None, G, 1e-6), ResnetBlock2D(c, c, None, G, 1e-6)], [VAEAttention(c, G)])


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions of the VAE mid block."""

    def __init__(self, c, G):
        super().__init__()
        self.group_norm = nn.GroupNorm(G, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def _mid_forward(mid, x):
    return mid.resnets[1](mid.attentions[0](mid.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, G, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Block([ResnetBlock2D(chs[max(i - 1, 0)] if j == 0 else chs[i], chs[i], None, G, 1e-6)
                   for j in range(cfg.layers_per_block)], downsample=Downsample2D(chs[i], 0) if i < n - 1 else None)
            for i in range(n))
        self.mid_block = _vae_mid(chs[-1], G)
        self.conv_norm_out = nn.GroupNorm(G, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
        x = _mid_forward(self.mid_block, x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, G, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = _vae_mid(chs[0], G)
        self.up_blocks = nn.ModuleList(
            Block([ResnetBlock2D(chs[max(i - 1, 0)] if j == 0 else chs[i], chs[i], None, G, 1e-6)
                   for j in range(cfg.layers_per_block + 1)], upsample=Upsample2D(chs[i]) if i < n - 1 else None)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(G, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = _mid_forward(self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode(x in [-1,1]) -> (mean, logvar) of the raw latent; decode(raw latent) -> image in [-1,1].
    The caller multiplies latents by `scaling_factor` before the U-Net and divides before decode (as diffusers)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg, self.scaling_factor = cfg, cfg.scaling_factor
        L = cfg.latent_channels
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * L, 2 * L, 1), nn.Conv2d(L, L, 1)

    def encode(self, x):  # (B, 3, H, W) -> 2 x (B, L, H/8, W/8)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, generator=None):  # sample a latent and reconstruct
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + (0.5 * logvar).exp() * noise)

    @classmethod
    def from_pretrained(cls, path, dtype=None, config: VAEConfig | None = None):
        path = Path(path)
        if path.is_dir():
            path = component_folder(path, "vae")
            cfg = config or VAEConfig.from_dict(read_json(path / "config.json"), path / "config.json")
            ckpt = open_checkpoint(weight_files(path, "diffusion_pytorch_model"))
            tensors = _renamed(ckpt, "", lambda k: _vae_key(k, 0), path)  # old attention names -> new
        else:
            ckpt = open_checkpoint([path])
            if "encoder.conv_in.weight" in ckpt:  # diffusers names in one file
                tensors = _renamed(ckpt, "", lambda k: _vae_key(k, 0), path)
            else:
                n_up = len({k.split(".")[3] for k in ckpt if k.startswith("first_stage_model.decoder.up.")})
                tensors = _renamed(ckpt, "first_stage_model.", lambda k: _vae_key(k, n_up), path)
            cfg = (config or _sibling_config(path, ckpt, "encoder.conv_in.weight", VAEConfig)
                   or _infer_vae_config(tensors))
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, tensors, str(path), dtype).eval()


# -----------------------------------------------------------------------------------------------------------------
# checkpoint layouts


def _sibling_config(path, ckpt, probe, cfg_cls):
    """The config.json beside a single weight file that uses diffusers names, if there is one."""
    file = path.parent / "config.json"
    return cfg_cls.from_dict(read_json(file), file) if probe in ckpt and file.is_file() else None


class _Renamed(dict):
    """key -> zero-arg loader, plus file_of() so load_strict's errors name the file."""

    def __init__(self, items, file):
        super().__init__(items)
        self.file = str(file)

    def file_of(self, key):
        return self.file


def _renamed(ckpt, prefix, rename, file):
    """Keys under `prefix`, renamed to our (diffusers) names, each mapped to a loader that reads it on demand."""
    def loader(key, name):
        if re.search(r"attentions\.0\.(to_[qkv]|to_out\.0)\.weight$", name):  # VAE attention, which the original
            return lambda: ckpt[key].flatten(1)  # stores as 1x1 convs [C, C, 1, 1] (no-op on [C, C])
        return lambda: ckpt[key]
    names = {k: rename(k[len(prefix):]) for k in ckpt if k.startswith(prefix)}
    return _Renamed({name: loader(k, name) for k, name in names.items()}, file)


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut", "nin_shortcut": "conv_shortcut"}


def _resnet_key(rest):
    head, _, tail = rest.rpartition(".")  # e.g. "in_layers.0" + "weight"
    return f"{_RESNET.get(head, head)}.{tail}"


def _original_layers_per_block(ckpt, prefix):
    """LDM numbers input_blocks consecutively: conv_in, then per level `lpb` resnets and a downsampler (`.0.op`)."""
    blocks = {int(m[1]) for k in ckpt if (m := re.match(re.escape(prefix) + r"input_blocks\.(\d+)\.", k))}
    ops = [int(m[1]) for k in ckpt if (m := re.match(re.escape(prefix) + r"input_blocks\.(\d+)\.0\.op\.", k))]
    return min(ops) - 1 if ops else len(blocks) - 1


def _unet_key(k, lpb):
    """Original LDM U-Net key (without `model.diffusion_model.`) -> diffusers key. `lpb` = layers per block."""
    k = k.replace("time_embed.0.", "time_embedding.linear_1.").replace("time_embed.2.", "time_embedding.linear_2.")
    k = re.sub(r"^out\.0\.", "conv_norm_out.", k)
    k = re.sub(r"^out\.2\.", "conv_out.", k)
    k = re.sub(r"^input_blocks\.0\.0\.", "conv_in.", k)
    if (m := re.match(r"middle_block\.(\d)\.(.*)", k)):
        i, rest = int(m[1]), m[2]
        return "mid_block.attentions.0." + rest if i == 1 else f"mid_block.resnets.{i // 2}." + _resnet_key(rest)
    if (m := re.match(r"(input|output)_blocks\.(\d+)\.(\d)\.(.*)", k)):
        side, n, part, rest = m[1], int(m[2]), int(m[3]), m[4]
        if side == "input":
            i, j = divmod(n - 1, lpb + 1)
            if j == lpb:  # the block's downsampler, `op` is its conv
                return f"down_blocks.{i}.downsamplers.0.conv." + rest.split(".", 1)[1]
            if part == 0:
                return f"down_blocks.{i}.resnets.{j}." + _resnet_key(rest)
            return f"down_blocks.{i}.attentions.{j}." + rest
        i, j = divmod(n, lpb + 1)
        if part == 0:
            return f"up_blocks.{i}.resnets.{j}." + _resnet_key(rest)
        if part == 2 or rest.startswith("conv."):  # upsampler sits after the attention, or after the resnet
            return f"up_blocks.{i}.upsamplers.0." + rest
        return f"up_blocks.{i}.attentions.{j}." + rest
    return k


def _vae_key(k, n_up):
    """Original (or old-diffusers) autoencoder key -> diffusers key. `n_up` = number of decoder levels."""
    if (m := re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", k)):
        side, i, what, j, rest = m[1], int(m[2]), m[3], m[4], m[5]
        blocks = "encoder.down_blocks" if side == "encoder.down" else "decoder.up_blocks"
        i = i if side == "encoder.down" else n_up - 1 - i  # original decoder counts levels from the bottom
        if j is not None:
            return f"{blocks}.{i}.resnets.{j}." + _resnet_key(rest)
        return f"{blocks}.{i}.{what}rs.0." + rest
    if (m := re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", k)):
        coder, what, rest = m[1], m[2], m[3]
        if what != "attn_1":
            return f"{coder}.mid_block.resnets.{int(what[-1]) - 1}." + _resnet_key(rest)
        k = f"{coder}.mid_block.attentions.0." + rest
    k = re.sub(r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    for old, new in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"),
                     ("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
        k = re.sub(rf"(attentions\.0)\.{old}\.(weight|bias)$", rf"\1.{new}.\2", k)
    return k


def _shape(tensors, key):
    if key not in tensors:
        raise CheckpointError(f"{tensors.file}: cannot infer the architecture, no tensor {key!r}")
    return tuple(tensors[key]().shape)


def _infer_unet_config(tensors) -> UNetConfig:
    """Architecture of a single-file SD U-Net from its tensor shapes (heads = channels / 64, as in SD 2)."""
    n = len({k.split(".")[1] for k in tensors if k.startswith("down_blocks.")})
    lpb = len({k.split(".")[3] for k in tensors if k.startswith("down_blocks.0.resnets.")})
    chs = tuple(_shape(tensors, f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n))
    down_cross = [f"down_blocks.{i}.attentions.0.norm.weight" in tensors for i in range(n)]
    up_cross = [f"up_blocks.{i}.attentions.0.norm.weight" in tensors for i in range(n)]
    a = "mid_block.attentions.0."
    depth = tuple(len({k.split(".")[5] for k in tensors
                       if k.startswith(f"down_blocks.{i}.attentions.0.transformer_blocks.")}) or 1 for i in range(n))
    return UNetConfig(
        in_channels=_shape(tensors, "conv_in.weight")[1], out_channels=_shape(tensors, "conv_out.weight")[0],
        block_out_channels=chs, layers_per_block=lpb,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in down_cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in up_cross),
        attention_head_dim=tuple(max(c // 64, 1) for c in chs),
        cross_attention_dim=_shape(tensors, a + "transformer_blocks.0.attn2.to_k.weight")[1],
        transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
        use_linear_projection=len(_shape(tensors, a + "proj_in.weight")) == 2,
        upcast_attention=True,  # not recorded in the weights; exact in fp32 and the safe choice in fp16
    )


def _infer_vae_config(tensors) -> VAEConfig:
    n = len({k.split(".")[2] for k in tensors if k.startswith("encoder.down_blocks.")})
    return VAEConfig(
        in_channels=_shape(tensors, "encoder.conv_in.weight")[1],
        out_channels=_shape(tensors, "decoder.conv_out.weight")[0],
        block_out_channels=tuple(_shape(tensors, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                                 for i in range(n)),
        layers_per_block=len({k.split(".")[4] for k in tensors if k.startswith("encoder.down_blocks.0.resnets.")}),
        latent_channels=_shape(tensors, "decoder.conv_in.weight")[1])
