"""
MM-Interleaved (Tian et al. 2024): one model that reads and writes interleaved text and images.

    image tokenizer   CLIP ViT + ViT-Adapter (vit.py) -> 4 multi-scale maps; Perceiver resampler -> N image tokens
    LLM               LLaMA (llm.py) with MMFS (mmfs.py) between attention and MLP of every k-th layer, behind
                      zero-initialised tanh gates; frozen LM head + 2 trainable rows (BoI, <|image|>)
    image decoder     LLM states from the document's <s> to BoI, reversed -> resampler -> U-Net context (unet.py);
                      MMFS on every U-Net skip (zero 1x1 convs) reads the previous image of the document
Exact choices follow the paper (sections 3.1-3.3, appendix A) and the authors' code (OpenGVLab/MM-Interleaved,
mm_interleaved/models/); docs/official.md lists them.

Public API
    cfg = MMIConfig.from_name("tiny", n_image_tokens=8, **{"llm.n_layers": 6})  # presets: "official", "tiny"
    model = MMI(cfg)                           # random init (tiny: everything trainable, from scratch)
    model = MMI.from_components(clip=..., llm=..., sd=...)   # official folders, paper freezing
    model = MMI.from_released(path, clip=..., llm=..., sd=...)  # the authors' released checkpoint (released.py)
    tok = model.tok                            # the LLM's tokenizer + <|beginofimage|>, <|image|> (tokenizer.py)
    h, lay, dec = model.hidden_states(tokens, images)        # LLM states [B, T, D], image layout, decoder values
    out = model(batch)                         # dict: loss, text_loss, image_loss, n_text, n_images
    model.denoise(x_t, t, cond, values, visible)             # U-Net + MMFS prediction (sampling: generate.py)
    model.param_groups(weight_decay)           # AdamW groups: lr / lr_unet / lr_offsets, no decay on 1-D & offsets
    model.set_grad_checkpointing(True)
    model.save(dir); MMI.load(dir)             # model.safetensors + config.json (see save() for what is stored)
Token format and batches: data.py (tokenize_document, collate); generation: generate.py.

Batch: tokens LongTensor [B, T] (<s> text BoI <|image|>*n ... </s>, right-padded with pad_id), images FloatTensor
[N, 3, H, W] in [0, 1] ordered by row then position (one per BoI), optional doc_ids [B, T] (document index per
row, -1 on padding; derived from <s> when absent).
"""
import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import released
from llm import LLaMA, LLaMAConfig, RMSNorm
from mmfs import MMFS, pixel_centres
from tokenizer import mmi_tokenizer
from diffusion import NoiseSchedule, cfg_combine
from unet import AutoencoderKL, UNet, UNetConfig, VAEConfig
from vit import CLIPVisionConfig, ViTAdapter, VisionTransformer, resize01, sincos_1d, sincos_2d, sincos_2d_resized
from weights import CheckpointError, check_finite, open_checkpoint, read_json

# The 2 new LM-head rows (BoI, <|image|>): a frozen part (weight 0, bias NEW_ROW_OFFSET) plus a trainable Linear
# (weight 0, bias BOI_INIT_LOGIT - NEW_ROW_OFFSET): both start at logit BOI_INIT_LOGIT (official)
NEW_ROW_OFFSET, BOI_INIT_LOGIT = -100.0, -5.0
QFORMER_EPS = 1e-12  # every LayerNorm of both Q-Formers (transformers' BLIP-2 default, official)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class MMIConfig:
    vision: dict = field(default_factory=lambda: asdict(CLIPVisionConfig()))   # vit.CLIPVisionConfig fields
    adapter: dict = field(default_factory=dict)                                # vit.ViTAdapter keyword arguments
    llm: dict = field(default_factory=dict)                                    # llm.LLaMAConfig fields
    unet: dict = field(default_factory=lambda: asdict(UNetConfig()))           # unet.UNetConfig fields
    vae: dict | None = field(default_factory=lambda: asdict(VAEConfig()))      # None: diffusion in pixel space
    schedule: dict = field(default_factory=dict)                               # diffusion.NoiseSchedule arguments
    tokenizer: str = "byte"            # "byte" (ByteTokenizer), "world" (assets/world.model), "llama" (the LLM
                                       # folder's tokenizer.model) or a SentencePiece tokenizer.model path
    pad_id: int | None = None          # None: the tokenizer's own (official: 31999)
    # image tokenizer: Q-Former-style Perceiver resampler reading the ViT tokens at the ViT's width (official: 64
    # tokens, 768 wide, 12 layers, 12 heads, FFN 3072, cross-attention in layers 0, 2, ..., qk-norm, dropout 0.1)
    n_image_tokens: int = 64
    res_dim: int = 768
    res_layers: int = 12
    res_heads: int = 12
    res_ffn: int = 3072                 # transformers' Q-Former default (the authors' YAML does not set it)
    res_cross_every: int = 2
    res_dropout: float = 0.1
    res_init_std: float = 0.02          # resampler Linear weights (official 0.02)
    res_out_std: float = 1e-3           # resampler output projection into the LLM (official N(0, 1e-3))
    # MMFS in the LLM (official: every 4th layer from 0, 16 heads x 64, 3 levels, 8 points, offsets +-3, an image
    # index table of 50 rows: row 0 for invisible images, at most 49 visible)
    mmfs_every: int = 4
    mmfs_heads: int = 16
    mmfs_head_dim: int = 64
    mmfs_points: int = 8
    mmfs_offset_init: float = 3.0
    max_images: int = 49
    mmfs_gate_init: float = 0.0         # tanh gate of the LLM MMFS (official 0: the LLM starts unchanged)
    use_mmfs: bool = True               # False: the ablation without MMFS, in the LLM and in the U-Net (paper Table 6)
    # image decoder (official: 1-layer resampler, 77 queries, 1024 wide = the U-Net's context width, 16 heads, FFN
    # 3072, no output Linear; MMFS 16 heads, 4 levels, 8 points, offsets +-1; 512 px; null condition for 10% of
    # images; loss weight 10)
    dec_queries: int = 77
    dec_dim: int = 1024
    dec_layers: int = 1
    dec_heads: int = 16
    dec_ffn: int = 3072
    dec_init_std: float = 0.02          # decoder resampler Linear weights (official 0.02, BLIP-2's)
    dec_mmfs_heads: int = 16
    dec_mmfs_head_dim: int = 64
    dec_mmfs_points: int = 8
    dec_mmfs_offset_init: float = 1.0
    image_size: int = 512
    null_prob: float = 0.1
    image_loss_weight: float = 10.0
    # what trains (official: ViT, LLaMA, LM head and VAE frozen; the tiny world trains everything from scratch)
    freeze_vit: bool = True
    freeze_llm: bool = True
    freeze_unet: bool = False           # official: the U-Net fine-tunes at lr_unet; the tiny world keeps its tiny SD's
    lr: float = 1e-4
    lr_unet: float = 1e-5
    lr_offsets: float = 1e-5            # every sampling_offsets layer (LLM, U-Net and adapter MMFS)
    components: dict | None = None      # official folders this model was assembled from (set by from_components)

    @property
    def boi_id(self):  # the two new tokens come right after the LLM's vocabulary (official: 32000, 32001)
        return self.llm["vocab_size"]

    @property
    def image_id(self):
        return self.llm["vocab_size"] + 1

    @classmethod
    def from_name(cls, name, **overrides):
        """A preset with fields overridden; "llm.n_layers"-style keys override one field of a sub-config."""
        d = json.loads(json.dumps(PRESETS[name]))  # deep copy
        for k, v in overrides.items():
            sub, _, key = k.partition(".")
            if key:
                if not isinstance(d.get(sub), dict):
                    raise KeyError(f"{k}: {sub} is not a sub-config")
                d[sub][key] = v
            elif k in {f.name for f in fields(cls)}:
                d[k] = v
            else:
                raise KeyError(f"unknown config field {k!r}")
        return cls(**d)


PRESETS = {
    "official": dict(
        adapter=dict(n_blocks=4, n_points=4, deform_ratio=0.5, cffn_ratio=0.25, n_extra_extractors=2),
        llm=dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-6,
                 max_seq_len=2048),  # Vicuna-13B v1.3
        schedule=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      set_alpha_to_one=False, clip_sample=False),  # SD 2.1-base scheduler_config.json
        tokenizer="llama", pad_id=31999),
    # A few million parameters for the synthetic 32 px world of data.py; trains on a 2-core CPU in minutes.
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    patch_size=8, image_size=32, layer_norm_eps=1e-5, num_channels=3, hidden_act="quick_gelu"),
        adapter=dict(n_blocks=4, n_points=4, deform_ratio=0.5, cffn_ratio=0.25, n_extra_extractors=2,
                     spm_channels=16),  # one ViT layer per interaction block; maps 16, 8, 4, 2 px for 32 px images
        tokenizer="world",  # 440-piece SentencePiece BPE of the synthetic world (assets/make_world_tokenizer.py)
        llm=dict(vocab_size=440, dim=128, n_layers=4, n_heads=4, hidden_dim=352, norm_eps=1e-5, max_seq_len=512),
        # 3 levels (32, 16, 8 px), attention at 16 and 8: a U-Net has no position embedding, only its zero padding
        # tells a pixel where it is, and that reaches across the image at 8x8 (with 2 levels: blobs drawn anywhere)
        unet=dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=1,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  attention_head_dim=[2, 4, 4], cross_attention_dim=64, norm_num_groups=8, sample_size=32),
        vae=None,
        schedule=dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      # tiny-only: v-prediction; epsilon draws noise after a few hundred steps at 32 px
                      prediction_type="v_prediction", timestep_spacing="leading", clip_sample=True),
        n_image_tokens=16, res_dim=64, res_layers=2, res_heads=4, res_ffn=256, res_dropout=0.0,
        res_init_std=0.125, res_out_std=0.1,  # tiny-only: from scratch the media must get through from step 0
        mmfs_every=2, mmfs_heads=4, mmfs_head_dim=16, mmfs_points=2, mmfs_offset_init=1.0, max_images=8,
        mmfs_gate_init=1.0,  # tiny-only: open gates (a zero-init gate stays near 0 for hundreds of steps)
        dec_queries=16, dec_dim=64, dec_heads=4, dec_ffn=256, dec_mmfs_heads=4, dec_mmfs_head_dim=16,
        dec_init_std=0.25,  # tiny-only: the condition must depend on the caption from step 0 (issue 16 probes)
        dec_mmfs_points=2, image_size=32, freeze_vit=False, freeze_llm=False, lr=1e-3, lr_unet=1e-3,
        lr_offsets=1e-3),  # tiny-only: offsets learn where to look at the lr of the rest (official 10x lower)
}


# -----------------------------------------------------------------------------
# Perceiver resampler (Q-Former style, as the official code; one class for both uses)


class ResamplerAttention(nn.Module):
    def __init__(self, dim, kv_dim, n_heads, qk_norm=False, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        hd = dim // n_heads  # qk-norm: a LayerNorm per head on queries and keys (official image resampler)
        self.q_norm = nn.LayerNorm(hd, eps=QFORMER_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hd, eps=QFORMER_EPS) if qk_norm else nn.Identity()

    def forward(self, x, kv, mask=None):  # x (B, T, dim), kv (B, S, kv_dim), mask (B, S) True = attend
        B, T, C = x.shape
        heads = lambda t: t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = self.q_norm(heads(self.q(x))), self.k_norm(heads(self.k(kv))), heads(self.v(kv))
        m = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class ResamplerLayer(nn.Module):
    """BERT-style (post-LN) layer: self-attention over the queries, optional cross-attention to the media, MLP."""

    def __init__(self, dim, media_dim, n_heads, ffn, cross, qk_norm, dropout):
        super().__init__()
        ln = functools.partial(nn.LayerNorm, dim, eps=QFORMER_EPS)
        self.self_attn, self.ln1 = ResamplerAttention(dim, dim, n_heads, qk_norm, dropout), ln()
        self.cross_attn = ResamplerAttention(dim, media_dim, n_heads, qk_norm, dropout) if cross else None
        self.ln2 = ln() if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.ln3, self.drop = ln(), nn.Dropout(dropout)

    def forward(self, x, media, mask=None):
        x = self.ln1(x + self.drop(self.self_attn(x, x)))
        if self.cross_attn is not None:
            x = self.ln2(x + self.drop(self.cross_attn(x, media, mask)))
        return self.ln3(x + self.drop(self.mlp(x)))


class Resampler(nn.Module):
    """n learned queries read a variable-length media sequence -> [B, n, out_dim] (Flamingo / BLIP-2 style); the
    media keep their own width (media_dim), the keys/values of the cross-attention map it to dim.
    out_dim None: no output Linear (the decoder's, whose width is the U-Net's context width)."""

    def __init__(self, n_queries, dim, n_layers, n_heads, media_dim, out_dim=None, ffn=None, cross_every=1,
                 qk_norm=False, dropout=0.0, out_std=0.02, init_std=0.02):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(n_queries, dim))
        self.ln_q, self.drop = nn.LayerNorm(dim, eps=QFORMER_EPS), nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, media_dim, n_heads, ffn or 4 * dim, i % cross_every == 0, qk_norm, dropout)
            for i in range(n_layers))
        self.out = nn.Linear(dim, out_dim) if out_dim else nn.Identity()
        for m in self.modules():  # BLIP-2's initialisation
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.queries, std=0.02)
        if out_dim:
            nn.init.normal_(self.out.weight, std=out_std)  # official image resampler: N(0, 1e-3) into the LLM
        self.gradient_checkpointing = False

    def _run(self, layer, *args):  # recompute in backward when gradient_checkpointing (as unet.UNet._run)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, media, mask=None):  # media (B, S, media_dim), mask (B, S) -> (B, n, out_dim)
        x = self.drop(self.ln_q(self.queries)).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            x = self._run(layer, x, media, mask)
        return self.out(x)


# -----------------------------------------------------------------------------
# MMFS inside the LLM


@dataclass
class ImageLayout:
    """Where the N images of a [B, T] batch are (row-major order of their BoI = the order of batch["images"]) and
    what each token may see (official "which images a token sees"; MMI.layout builds it)."""
    rows: torch.Tensor         # (N,) row of each image's BoI
    pos: torch.Tensor          # (N,) position of its BoI
    start: torch.Tensor        # (N,) first position of its document
    slot: torch.Tensor         # (N,) index among the images of its row
    prev: torch.Tensor         # (N,) index of the previous image of the same document, -1 if none
    has_context: torch.Tensor  # (N,) bool: more than <s> before the BoI (no image loss otherwise)
    visible: torch.Tensor      # (B, T, n_max) bool: token t sees image slot n of its row
    n_max: int                 # most images in one row


@dataclass
class VisualContext:
    """What the MMFS layers of one LLM call read (the `ctx` that LLaMA.forward_hidden passes through)."""
    values: torch.Tensor | None  # (B, N, S, Dv) levels 2-4 of each row's images, flattened; N = most images in a row
    shapes: torch.Tensor         # (L, 2) (H, W) of the levels
    visible: torch.Tensor        # (B, T, N) bool: token t sees image n (same document, at or after its first <|image|>)
    projected: dict | None = None  # GatedMMFS -> its project_values(values) (B, N, S, heads*head_dim), when already
                                   # known (generation projects each image once, not once per token; values: None)


class GatedMMFS(nn.Module):
    """h + tanh(gate) * MMFS(RMSNorm(h), RMSNorm(visual features)), gate = 0 at init (official, Flamingo-style)."""

    def __init__(self, dim, vis_dim, cfg: MMIConfig, eps, grid):
        super().__init__()
        self.norm_q, self.norm_v = RMSNorm(dim, eps), RMSNorm(vis_dim, eps)
        self.mmfs = MMFS(dim, vis_dim, cfg.mmfs_heads, 3, cfg.mmfs_points, head_dim=cfg.mmfs_head_dim, out_dim=dim,
                         offset_init=cfg.mmfs_offset_init, max_images=cfg.max_images, base_grid=grid)
        self.gate = nn.Parameter(torch.full((1,), float(cfg.mmfs_gate_init)))

    def project_values(self, values):
        """Visual features [..., Dv] -> the values MMFS samples from [..., heads*head_dim] (per position)."""
        return self.mmfs.project_values(self.norm_v(values))

    def forward(self, h, ctx: VisualContext | None):
        g = torch.tanh(self.gate)
        if ctx is None or ctx.visible.shape[-1] == 0:  # no image anywhere: every token reads the null key = the bias
            return h + (g * self.mmfs.output_proj.bias).to(h.dtype)
        ref = h.new_full((1, 2), 0.5, dtype=torch.float32)  # reference point: the image centre
        v = ctx.projected[self] if ctx.projected is not None else self.project_values(ctx.values)
        y = self.mmfs(self.norm_q(h), ref, v, ctx.shapes, ctx.visible, value_projected=True)
        return h + (g * y).to(h.dtype)


# -----------------------------------------------------------------------------
# The model


class MMI(nn.Module):
    def __init__(self, cfg: MMIConfig, vit=None, llm=None, unet=None, vae=None):
        super().__init__()
        self.cfg = cfg
        # (1) image tokenizer: ViT + adapter -> tokens and 4 maps; at the ViT's width Dv: Linear -> LN + 2D sin-cos
        # -> LN -> resampler (its cross-attention maps Dv to res_dim)
        vit = vit or VisionTransformer(CLIPVisionConfig(**cfg.vision))
        self.adapter = ViTAdapter(vit, **cfg.adapter)
        Dv, self.grid = vit.cfg.hidden_size, vit.cfg.image_size // vit.cfg.patch_size
        self.llm = llm or LLaMA(LLaMAConfig(**cfg.llm))
        D, V = self.llm.cfg.dim, self.llm.cfg.vocab_size
        self.vis_proj = nn.Linear(Dv, Dv)
        self.vis_ln1, self.vis_ln2 = nn.LayerNorm(Dv, eps=1e-6), nn.LayerNorm(Dv, eps=1e-6)
        self.resampler = Resampler(cfg.n_image_tokens, cfg.res_dim, cfg.res_layers, cfg.res_heads, Dv, D, cfg.res_ffn,
                                   cfg.res_cross_every, qk_norm=True, dropout=cfg.res_dropout, out_std=cfg.res_out_std,
                                   init_std=cfg.res_init_std)
        # (2) LLM: MMFS in layers 0, k, 2k, ...; BoI embedding = frozen base row + learnable zero-init vector;
        # LM head + 2 rows (NEW_ROW_OFFSET, BOI_INIT_LOGIT above)
        for i in range(0, self.llm.cfg.n_layers, cfg.mmfs_every) if cfg.use_mmfs else []:
            self.llm.insert(i, GatedMMFS(D, Dv, cfg, self.llm.cfg.norm_eps, self.grid))
        self.register_buffer("boi_base", torch.randn(D) * 0.02)  # stands for the resized table's new row
        self.boi = nn.Parameter(torch.zeros(D))
        self.new_head = nn.Linear(D, 2)
        nn.init.zeros_(self.new_head.weight)
        nn.init.constant_(self.new_head.bias, BOI_INIT_LOGIT - NEW_ROW_OFFSET)
        # the frozen bias of the extended LM head (official text_decoder.head.bias): 0 on the LLM's rows
        self.head_bias = nn.Parameter(torch.cat([torch.zeros(V), torch.full((2,), NEW_ROW_OFFSET)]),
                                      requires_grad=False)
        # (3) image decoder: context projection + 1D sin-cos -> resampler -> U-Net context; MMFS on U-Net skips
        self.unet = unet or UNet(UNetConfig.from_dict(cfg.unet))
        C = self.unet.cfg.cross_attention_dim
        if cfg.dec_dim != C:
            raise ValueError(f"dec_dim {cfg.dec_dim} must be the U-Net's cross-attention width {C} (official: the "
                             "decoder resampler has no output Linear)")
        self.ctx_proj = nn.Linear(D, D)
        self.dec_resampler = Resampler(cfg.dec_queries, C, cfg.dec_layers, cfg.dec_heads, D, ffn=cfg.dec_ffn,
                                       init_std=cfg.dec_init_std)
        self.null_cond = nn.Parameter(torch.randn(cfg.dec_queries, C))  # official: SD's text encoding of ""
        self.vae = vae if vae is not None else AutoencoderKL(VAEConfig.from_dict(cfg.vae)) if cfg.vae else None
        self.latent = cfg.image_size // (8 if self.vae is not None else 1)
        # each tap: LayerNorm(skip) + 2D sin-cos queries; its own LayerNorm over all four adapter levels of the
        # previous image as values
        taps = self.unet.taps if cfg.use_mmfs else []
        self.dec_norm_q = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c, _ in taps)
        self.dec_norm_v = nn.ModuleList(nn.LayerNorm(Dv, eps=1e-6) for _ in taps)
        self.dec_mmfs = nn.ModuleList(
            MMFS(c, Dv, cfg.dec_mmfs_heads, 4, cfg.dec_mmfs_points, head_dim=cfg.dec_mmfs_head_dim,
                 offset_init=cfg.dec_mmfs_offset_init, max_images=1, base_grid=(self.latent // s, self.latent // s))
            for c, s in taps)
        # ControlNet-style zero-initialised 1x1 convs, written as the per-pixel Linear they are (faster on a CPU)
        self.dec_zero = nn.ModuleList(nn.Linear(c, c) for c, _ in taps)
        for conv in self.dec_zero:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.freeze()

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def freeze(self):
        """The paper's freezing: ViT, LLaMA (embeddings, blocks, LM head) and VAE frozen; the rest trains."""
        if self.cfg.freeze_vit:
            self.adapter.vit.requires_grad_(False)
        if self.cfg.freeze_llm:
            for name, p in self.llm.named_parameters():
                p.requires_grad_(".inserted." in name)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        if self.cfg.freeze_unet:  # the U-Net only: its MMFS taps (dec_*) are new modules and train
            self.unet.requires_grad_(False)

    @property
    def schedule(self):
        if not hasattr(self, "_schedule"):
            self._schedule = NoiseSchedule(**self.cfg.schedule)
        return self._schedule

    @functools.cached_property
    def tok(self):
        """The model's tokenizer (tokenizer.mmi_tokenizer): the LLM's own with BoI and <|image|> appended."""
        llm_path = (self.cfg.components or {}).get("llm")
        tok = mmi_tokenizer(self.cfg.tokenizer, self.llm.cfg.vocab_size, self.cfg.pad_id, llm_path)
        assert (tok.boi_id, tok.image_id) == (self.cfg.boi_id, self.cfg.image_id)
        return tok

    # --- image tokenizer ----------------------------------------------------------------------------------------
    def encode_images(self, images01):
        """[N, 3, H, W] in [0, 1] -> (embeddings [N, n_tok, D] for the <|image|> slots, maps: 4 x [N, Dv, h, w])."""
        tokens, maps = self.adapter(images01)
        x = self.vis_ln1(self.vis_proj(tokens.to(self.vis_proj.weight.dtype)))    # (N, 1+g*g, Dv)
        g, Dv = self.grid, x.shape[-1]
        pos = torch.cat([x.new_zeros(1, Dv), sincos_2d(g, g, Dv, x.device, x.dtype)])  # class token: no position
        return self.resampler(self.vis_ln2(x + pos)), maps

    @staticmethod
    def flatten_maps(maps):  # list of [N, Dv, h, w] -> ([N, sum h*w, Dv], shapes [L, 2])
        values = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        return values, torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=values.device)

    # --- sequence -----------------------------------------------------------------------------------------------
    def layout(self, tokens, doc_ids=None) -> ImageLayout:
        """Where the images are in a [B, T] batch and what each token may see: see ImageLayout."""
        B, T = tokens.shape
        bos, dev = self.tok.bos_id, tokens.device
        if doc_ids is None:
            doc_ids = (tokens == bos).long().cumsum(1)
        rows, pos = (tokens == self.cfg.boi_id).nonzero(as_tuple=True)  # (N,), (N,)
        N = rows.shape[0]
        doc = doc_ids[rows, pos]
        start = (doc_ids[rows] == doc[:, None]).long().argmax(1)         # first position of the image's document
        first = torch.searchsorted(rows, rows)                           # index of each row's first image
        slot = torch.arange(N, device=dev) - first                       # image index within its row
        n_max = int(slot.max()) + 1 if N else 0
        img_doc = torch.full((B, n_max), -2, dtype=doc.dtype, device=dev).index_put((rows, slot), doc)
        img_pos = torch.full((B, n_max), T, dtype=pos.dtype, device=dev).index_put((rows, slot), pos)
        t = torch.arange(T, device=dev)
        # token t sees image n iff same document and t is after its BoI (>= its first <|image|>): BoI doesn't see it
        visible = (doc_ids[:, :, None] == img_doc[:, None, :]) & (t[None, :, None] > img_pos[:, None, :])
        same = torch.zeros(N, dtype=torch.bool, device=dev)
        if N > 1:
            same[1:] = (rows[1:] == rows[:-1]) & (doc[1:] == doc[:-1])
        prev = torch.where(same, torch.arange(N, device=dev) - 1, -1)    # previous image, same document
        only_bos = (pos == start) | ((pos == start + 1) & (tokens[rows, start] == bos))
        return ImageLayout(rows, pos, start, slot, prev, ~only_bos, visible, n_max)

    def embed(self, tokens, image_embeds=None):
        """Token ids [B, T] -> input embeddings: text from the LLM table, BoI = base row + learnable vector,
        <|image|> slots filled with the image embeddings [N, n_tok, D] in order."""
        V = self.llm.cfg.vocab_size
        h = self.llm.embed(tokens.clamp(max=V - 1))
        h = torch.where((tokens == self.cfg.boi_id)[..., None], (self.boi_base + self.boi).to(h.dtype), h)
        slots = tokens == self.cfg.image_id
        if image_embeds is not None and image_embeds.numel():
            assert int(slots.sum()) == image_embeds.shape[0] * image_embeds.shape[1], "image slots != image tokens"
            h = h.masked_scatter(slots[..., None], image_embeds.to(h.dtype))
        return h

    def visual_context(self, lay: ImageLayout, values, shapes, B):
        """Per-row image values [B, n_max, S, Dv] and the visibility mask for the LLM's MMFS layers."""
        if values is None or lay.n_max == 0:
            return None
        per_row = values.new_zeros(B, lay.n_max, *values.shape[1:]).index_put((lay.rows, lay.slot), values)
        return VisualContext(per_row, shapes, lay.visible)

    def logits(self, h):
        """Frozen LM head for the text vocabulary + the trainable rows of BoI and <|image|>, plus the frozen head
        bias -> [..., V + 2]."""
        new = self.new_head(h.to(self.new_head.weight.dtype))
        return torch.cat([self.llm.lm_head(h).float(), new.float()], -1) + self.head_bias.float()

    def text_targets(self, tokens, pairs=False, doc_ids=None):
        """Next-token targets, -100 where ignored: pad, <|image|>, <s>, and BoI right after <s> (official).
        pairs=True (image-text pair batches, official LAION rule): also every target with no BoI at or before it in
        its document, so a caption written before its image gets no text loss."""
        inp, tgt = tokens[:, :-1], tokens[:, 1:].clone()
        bos = self.tok.bos_id
        ignore = (tgt == self.tok.pad_id) | (tgt == self.cfg.image_id) | (tgt == bos) | \
                 ((tgt == self.cfg.boi_id) & (inp == bos))
        if pairs:
            doc = (tokens == bos).long().cumsum(1) if doc_ids is None else doc_ids
            boi = (tokens == self.cfg.boi_id).long().cumsum(1)                    # BoIs up to and including t
            at_start = torch.where(doc[:, 1:] != doc[:, :-1], boi[:, :-1], 0)     # BoIs before each document
            first = torch.cat([boi.new_zeros(boi.shape[0], 1), at_start], 1).cummax(1).values
            ignore |= (boi == first)[:, 1:]                                       # none in the document so far
        return tgt.masked_fill(ignore, -100)

    # --- image decoder ------------------------------------------------------------------------------------------
    def condition(self, h, rows, starts, ends):
        """LLM states from each document start to its BoI, reversed (BoI first) -> Linear + 1D sin-cos ->
        resampler -> U-Net context [n, dec_queries, C]."""
        lens = ends - starts + 1
        L = int(lens.max())
        ar = torch.arange(L, device=h.device)
        idx = (ends[:, None] - ar).clamp(min=0)                                  # (n, L): BoI, BoI-1, ...
        x = self.ctx_proj(h[rows[:, None], idx].to(self.ctx_proj.weight.dtype))  # (n, L, D)
        x = x + sincos_1d(L, x.shape[-1], x.device, x.dtype)
        return self.dec_resampler(x, ar < lens[:, None])

    def project_decoder_values(self, values):
        """values [n, 1, S, Dv] of the images that have a previous image -> what each U-Net MMFS samples from: its
        projection of the values normed by its own LayerNorm."""
        return [mmfs.project_values(norm(values)) for norm, mmfs in zip(self.dec_norm_v, self.dec_mmfs)]

    def denoise(self, x, t, cond, values, visible, projected=None):
        """U-Net prediction with MMFS residuals on the skips and mid block (official "MMFS in the UNet").
        values ([n, 1, S, Dv] flattened 4 adapter levels of the previous image, shapes), visible [n] bool;
        projected: project_decoder_values(values[0][visible]) when already known (sampling: once for all steps)."""
        skips, mid, emb = self.unet.down(x, t, cond)
        if not self.dec_mmfs:  # use_mmfs=False: the plain U-Net
            return self.unet.up(skips, mid, emb, cond)
        shapes = values[1]
        seen = visible.nonzero(as_tuple=True)[0]
        projected = projected if projected is not None else self.project_decoder_values(values[0][seen])
        feats = []
        for f, norm, mmfs, conv, v in zip([*skips, mid], self.dec_norm_q, self.dec_mmfs, self.dec_zero, projected):
            B, C, H, W = f.shape
            y = mmfs.output_proj.bias.expand(B, H * W, C)  # no previous image: MMFS reads only the null key
            if len(seen):  # compute MMFS just for the images that have a previous image (exactly the same result)
                pos = sincos_2d_resized(self.latent, H, W, C, f.device, f.dtype)  # one latent-size table, resized
                q = norm(f[seen].flatten(2).transpose(1, 2)) + pos               # (b, H*W, C)
                y = y.index_copy(0, seen, mmfs(q, pixel_centres(H, W, f.device), v, shapes,
                                               q.new_ones(len(seen), H * W, 1, dtype=torch.bool), value_projected=True))
            feats.append(f + conv(y).transpose(1, 2).reshape(B, C, H, W).to(f.dtype))
        return self.unet.up(feats[:-1], feats[-1], emb, cond)

    def to_latent(self, x01, eps=None):
        """Images in [0, 1] -> a sample of the VAE posterior (eps: its standard-normal draw), scaled."""
        x = resize01(x01, self.cfg.image_size) * 2 - 1
        if self.vae is None:
            return x
        mean, logvar = self.vae.encode(x.to(next(self.vae.parameters()).dtype))
        eps = torch.randn_like(mean) if eps is None else eps.to(mean)
        return (mean + (0.5 * logvar).exp() * eps) * self.vae.scaling_factor

    def from_latent(self, z):
        if self.vae is not None:
            z = self.vae.decode(z.to(next(self.vae.parameters()).dtype) / self.vae.scaling_factor)
        return ((z.float() + 1) / 2).clamp(0, 1)

    def decoder_values(self, dec_values, shapes, prev):
        """MMFS values of the previous image of each image to generate (prev = index or -1)."""
        return (dec_values[prev.clamp(min=0)][:, None], shapes), prev >= 0

    # --- the whole model ----------------------------------------------------------------------------------------
    def llm_inputs(self, tokens, images=None, doc_ids=None):
        """tokens [B, T], images [N, 3, H, W] in [0, 1] (one per BoI, row-major) -> (input embeddings [B, T, D], the
        LLM's VisualContext or None, the ImageLayout, the decoder's MMFS values: (all four adapter levels
        [N, S, Dv], shapes) or None)."""
        lay = self.layout(tokens, doc_ids)
        N = lay.rows.shape[0]
        if (0 if images is None else images.shape[0]) != N:
            raise ValueError(f"batch has {N} BoI tokens but {0 if images is None else images.shape[0]} images")
        emb = ctx = dec = None
        if N:
            emb, maps = self.encode_images(images)
            ctx = self.visual_context(lay, *self.flatten_maps(maps[1:]), tokens.shape[0])  # levels 32/16/8 px
            dec = self.flatten_maps(maps)                                                  # all four levels
        return self.embed(tokens, emb), ctx, lay, dec

    def hidden_states(self, tokens, images=None, doc_ids=None):
        """-> (final LLM states [B, T, D], the ImageLayout, the decoder's MMFS values), as llm_inputs."""
        x, ctx, lay, dec = self.llm_inputs(tokens, images, doc_ids)
        return self.llm.forward_hidden(embeds=x, ctx=ctx), lay, dec                       # (B, T, D)

    def forward(self, batch, draws=None):
        """The two losses of the paper (section 3.3): next-token cross-entropy on text, and the diffusion loss of
        every image that has text before it, conditioned on the LLM states up to its BoI.
        Optional batch keys: doc_ids; images_dec [N, 3, S, S] (the decoder's own crops; default: images resized);
        pairs (True: the image-text-pair text rule of text_targets).
        draws: replay the random draws, each for all N images (official names): noise, timesteps, vae_eps, and
        uncond_rand (null condition where < null_prob; applied in eval mode too when given)."""
        tokens, images = batch["tokens"], batch.get("images")
        h, lay, dec = self.hidden_states(tokens, images, batch.get("doc_ids"))
        tgt = self.text_targets(tokens, batch.get("pairs", False), batch.get("doc_ids"))
        text_loss = F.cross_entropy(self.logits(h[:, :-1]).flatten(0, 1), tgt.flatten(), ignore_index=-100)
        n_text = int((tgt != -100).sum())
        if n_text == 0:
            text_loss = h.sum() * 0.0

        sel = lay.has_context.nonzero(as_tuple=True)[0]  # no image loss when the context is only <s> BoI
        image_loss = text_loss.new_zeros(())
        if len(sel):
            d = {k: v[sel.to(v.device)] for k, v in (draws or {}).items()}  # the draws of the images with a loss
            cond = self.condition(h, lay.rows[sel], lay.start[sel], lay.pos[sel])
            if self.training or "uncond_rand" in d:  # classifier-free guidance: the null condition for 10%
                u = d["uncond_rand"].reshape(-1) if "uncond_rand" in d else torch.rand(len(sel), device=cond.device)
                drop = (u.to(cond.device) < self.cfg.null_prob)[:, None, None]
                cond = torch.where(drop, self.null_cond.to(cond.dtype), cond)
            with torch.no_grad():
                x0 = self.to_latent(batch.get("images_dec", images)[sel], d.get("vae_eps"))
            noise = d["noise"].to(x0) if "noise" in d else torch.randn_like(x0)
            t = d["timesteps"].to(x0.device) if "timesteps" in d else \
                torch.randint(0, self.schedule.N, (len(sel),), device=x0.device)
            values, visible = self.decoder_values(*dec, lay.prev[sel])
            pred = self.denoise(self.schedule.add_noise(x0, noise, t), t, cond, values, visible)
            err = (pred.float() - self.schedule.target(x0, noise, t).float()).square().flatten(1).mean(1)
            image_loss = err.sum() / len(lay.rows)  # a mean over ALL images, those without context as zeros (official)
        loss = text_loss + self.cfg.image_loss_weight * image_loss
        # every trainable parameter takes part in every step (a batch without images, or whose images have no
        # context, would leave some unused): DDP then needs no find_unused_parameters. Adds exactly zero.
        loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad)
        return dict(loss=loss, text_loss=text_loss.detach(), image_loss=image_loss.detach(), n_text=n_text,
                    n_images=len(sel))

    # --- building, saving, training helpers ---------------------------------------------------------------------
    @classmethod
    def from_components(cls, clip, llm, sd, preset="official", dtype=None, null_cond=None, **overrides):
        """Assemble from official folders: a CLIP model folder, a LLaMA-family folder (with tokenizer.model) and a
        Stable Diffusion 2.x pipeline root. ViT and LLaMA load in `dtype` (default: as stored); U-Net and VAE fp32.
        null_cond: optional [dec_queries, C] tensor (official: SD's text encoding of "")."""
        vit = VisionTransformer.from_pretrained(clip, dtype)
        lm = LLaMA.from_pretrained(llm, dtype)
        unet, schedule = cls._stable_diffusion(sd, preset)
        vae = AutoencoderKL.from_pretrained(sd, torch.float32)
        cfg = MMIConfig.from_name(
            preset, vision=asdict(vit.cfg), llm=asdict(lm.cfg), unet=asdict(unet.cfg), vae=asdict(vae.cfg),
            schedule=schedule, components=dict(clip=str(clip), llm=str(llm), sd=str(sd)), **overrides)
        model = cls(cfg, vit=vit, llm=lm, unet=unet, vae=vae)
        with torch.no_grad():
            model.boi_base.copy_(lm.embed.weight.float().mean(0))  # as a resized embedding table's new row
            if null_cond is not None:
                model.null_cond.copy_(null_cond)
        return model

    @staticmethod
    def _stable_diffusion(sd, preset):
        """The U-Net (fp32) and the schedule's settings of a Stable Diffusion folder (the preset's schedule if the
        folder has none)."""
        has_schedule = (Path(sd) / "scheduler" / "scheduler_config.json").is_file()
        schedule = NoiseSchedule.from_pretrained(sd).config if has_schedule else PRESETS[preset]["schedule"]
        return UNet.from_pretrained(sd, torch.float32), schedule

    @classmethod
    def on_stable_diffusion(cls, sd, preset="tiny", null_cond=None, **overrides):
        """The tiny world built as the paper is built: the U-Net and schedule of a pretrained (tiny) Stable Diffusion
        folder (tiny_sd.py), everything else of the preset new; null_cond: SD's text encoding of "" (paper: the null
        condition starts there). The result is self-contained: save() stores its U-Net too."""
        fixed = [k for k in overrides if k.partition(".")[0] in ("unet", "schedule")]
        if fixed:
            raise ValueError(f"{sd}: the U-Net and schedule come from the folder; cannot override {fixed}")
        unet, schedule = cls._stable_diffusion(sd, preset)
        model = cls(MMIConfig.from_name(preset, unet=asdict(unet.cfg), schedule=schedule, **overrides), unet=unet)
        if null_cond is not None:
            if null_cond.shape != model.null_cond.shape:
                raise ValueError(f"{sd}: the empty caption encodes to {tuple(null_cond.shape)}, the decoder makes "
                                 f"{tuple(model.null_cond.shape)} (dec_queries x context width must match)")
            with torch.no_grad():
                model.null_cond.copy_(null_cond)
        return model

    @classmethod
    def from_released(cls, path, clip, llm, sd, config=None, dtype=None):
        """The authors' released checkpoint: `path` a folder of their .bin shards of the whole model's state dict
        (or one file); clip / llm / sd the component folders as for from_components; config the authors' model
        settings (their YAML's model section, or fixture.json's model_config) where they differ from the release.
        Every tensor is mapped by released.py (strict, lazy). The frozen ViT, LLaMA and VAE stay those of the
        component folders (so save() / load() reproduce the model); the checkpoint's copies must agree with them."""
        config = config or {}
        model = cls.from_components(clip, llm, sd, dtype=dtype, **released.overrides(config))
        released.check_config(config, model.cfg, "released config")
        ckpt = released.released_checkpoint(path)
        state = model.state_dict()
        plan = released.convert(ckpt, state, ckpt.file_of)
        frozen = model.official_keys()
        missing = state.keys() - plan.keys() - frozen
        if missing:
            raise CheckpointError(f"{path}: the released checkpoint lacks {sorted(missing)[:10]}")
        for k in sorted(frozen & plan.keys()):  # fp16/bf16 rounding passes, another component does not
            ours, theirs = state[k].float(), plan.pop(k).float()
            if (ours - theirs).abs().max() > 1e-2 * ours.abs().max():
                raise CheckpointError(f"{path}: {k!r} differs from the component folders' (another CLIP / LLaMA / "
                                      "VAE than the release was trained with?)")
        released.assign(model, plan)
        return model

    def official_keys(self):
        """State-dict keys that come frozen from official component files (not saved by save())."""
        if not self.cfg.components:
            return set()
        keys = {"adapter.vit." + k for k in self.adapter.vit.state_dict()} if self.cfg.freeze_vit else set()
        if self.cfg.freeze_llm:
            keys |= {"llm." + k for k in self.llm.state_dict() if ".inserted." not in k}
        return keys | {"vae." + k for k in self.vae.state_dict()}

    def save(self, path):
        """path/model.safetensors + path/config.json, each written to a temporary file then os.replace'd.
        A model from from_components stores everything except the frozen official ViT, LLaMA and VAE tensors
        (its U-Net is fine-tuned, so it is stored); load() reads those from cfg.components again."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        skip, seen, tensors = self.official_keys(), set(), {}
        for k, v in self.state_dict().items():
            if k in skip:
                continue
            v = v.detach().cpu()
            tensors[k] = v.clone() if v.data_ptr() in seen else v.contiguous()  # safetensors refuses shared memory
            seen.add(v.data_ptr())
        for name, write in [("model.safetensors", lambda f: save_file(tensors, f)),
                            ("config.json", lambda f: Path(f).write_text(json.dumps(asdict(self.cfg), indent=1)))]:
            tmp = path / f".{name}.tmp"
            write(str(tmp))
            os.chmod(tmp, 0o644)  # safetensors creates its files 0600; a model folder is for everyone to read
            os.replace(tmp, path / name)

    @classmethod
    def load(cls, path, components=None, map_location="cpu"):
        """Inverse of save(). components: override the official folders recorded in the config."""
        path = Path(path)
        file = path / "model.safetensors"
        d = read_json(path / "config.json")
        unknown = d.keys() - {f.name for f in fields(MMIConfig)}
        if unknown:
            raise CheckpointError(f"{path / 'config.json'}: unknown config keys {sorted(unknown)}")
        cfg = MMIConfig(**d)
        if cfg.components:
            comp = {**cfg.components, **(components or {})}
            keep = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in
                    ("vision", "llm", "unet", "vae", "schedule", "components")}
            model = cls.from_components(comp["clip"], comp["llm"], comp["sd"], **keep)
        else:
            model = cls(cfg)
        ckpt = open_checkpoint(file)  # the checked reader: a truncated or corrupt file is a CheckpointError
        tensors = {k: ckpt[k] for k in ckpt}
        check_finite(tensors, str(file))  # NaN / inf weights would only show as a silent, blank demo
        expected = model.state_dict()
        for k in model.official_keys():
            expected.pop(k)
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or unexpected:
            raise CheckpointError(f"{file}: missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
        with torch.no_grad():
            for k, target in expected.items():
                v = tensors[k]
                if v.shape != target.shape:
                    raise CheckpointError(f"{file}: tensor {k!r} has shape {tuple(v.shape)}, model expects "
                                          f"{tuple(target.shape)}")
                target.copy_(v)
        return model.to(map_location)

    def param_groups(self, weight_decay=0.05, lr=None, lr_unet=None, lr_offsets=None):
        """AdamW groups (official rules): lr_offsets for every sampling_offsets layer, lr_unet for the U-Net, lr for
        the rest; no weight decay on biases, nn.LayerNorm parameters, MMFS gates and sampling offsets. Decayed, as
        officially: RMSNorm and GroupNorm weights, the SPM's channels-first LayerNorms (another class there), the
        adapter's gammas, the BoI vector, embeddings and queries."""
        lr, lr_unet = lr or self.cfg.lr, lr_unet or self.cfg.lr_unet
        lr_offsets = lr_offsets or self.cfg.lr_offsets
        unet_ids = {id(p) for p in self.unet.parameters()}
        layer_norm = {id(p) for m in self.modules() if type(m) is nn.LayerNorm for p in m.parameters(recurse=False)}
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            offsets = "sampling_offsets" in name
            group_lr = lr_offsets if offsets else lr_unet if id(p) in unet_ids else lr
            decay = not (offsets or name.endswith((".gate", "bias")) or id(p) in layer_norm)
            groups.setdefault((group_lr, decay), []).append(p)
        return [dict(params=ps, lr=glr, weight_decay=weight_decay if decay else 0.0)
                for (glr, decay), ps in groups.items()]

    def set_grad_checkpointing(self, on=True):
        """Recompute activations in backward for ViT blocks, resampler layers, LLM blocks and U-Net blocks."""
        for module in (self.adapter.vit, self.resampler, self.llm, self.unet):
            module.gradient_checkpointing = on

    def param_counts(self):
        """{component: (total, trainable)} parameter counts, split as the authors' modules are. The ViT's
        post-LayerNorm (in the CLIP file, never used; the authors' model has none) is not counted."""
        named = dict(self.named_parameters())

        def part(*prefixes):
            return [p for n, p in named.items() if n.startswith(prefixes)]
        parts_p = dict(
            vit=[p for n, p in named.items() if n.startswith("adapter.vit.") and ".post_layernorm." not in n],
            adapter=[p for n, p in named.items() if n.startswith("adapter.") and not n.startswith("adapter.vit.")],
            resampler=part("vis_", "resampler."),
            llm=[p for n, p in named.items() if n.startswith(("llm.embed.", "llm.layers.", "llm.norm."))
                 and ".inserted." not in n],
            llm_mmfs=[p for n, p in named.items() if ".inserted." in n],
            text_head=part("llm.lm_head.", "head_bias", "new_head."),
            boi=part("boi"),
            decoder_context=part("ctx_proj.", "dec_resampler.", "null_cond"),
            unet=part("unet."),
            unet_mmfs=part("dec_norm_", "dec_mmfs.", "dec_zero."),
            vae=part("vae."))
        return {k: (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))
                for k, ps in parts_p.items()}
