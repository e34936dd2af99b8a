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
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm import LLaMA, LLaMAConfig, RMSNorm
from mmfs import MMFS, pixel_centres
from tokenizer import mmi_tokenizer
from diffusion import NoiseSchedule, guided
from unet import AutoencoderKL, UNet, UNetConfig, VAEConfig
from vit import CLIPVisionConfig, ViTAdapter, VisionTransformer, resize01, sincos_1d, sincos_2d, sincos_2d_resized
from weights import recompute_in_backward

# The 2 new LM-head rows (BoI, <|image|>): a frozen part (weight 0, bias NEW_ROW_OFFSET) plus a trainable Linear
# (weight 0, bias BOI_INIT_LOGIT - NEW_ROW_OFFSET): both start at logit BOI_INIT_LOGIT (official)
NEW_ROW_OFFSET, BOI_INIT_LOGIT = -100.0, -5.0
QFORMER_EPS = 1e-12  # every LayerNorm of both Q-Formers (transformers' BLIP-2 default, official)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ResamplerConfig:
    """The image tokenizer's Q-Former-style Perceiver resampler, reading the ViT tokens at the ViT's width (official:
    768 wide, 12 layers, 12 heads, FFN 3072, cross-attention in layers 0, 2, ..., qk-norm, dropout 0.1)."""
    dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072                     # transformers' Q-Former default (the authors' YAML does not set it)
    cross_every: int = 2
    dropout: float = 0.1
    init_std: float = 0.02              # Linear weights (official 0.02)
    out_std: float = 1e-3               # the output projection into the LLM (official N(0, 1e-3))


@dataclass
class LLMMMFSConfig:
    """MMFS in the LLM (official: every 4th layer from 0, 16 heads x 64, 3 levels, 8 points, offsets +-3 cells)."""
    every: int = 4
    heads: int = 16
    head_dim: int = 64
    points: int = 8
    offset_init: float = 3.0
    gate_init: float = 0.0              # the tanh gate (official 0: the LLM starts unchanged)


@dataclass
class DecoderConfig:
    """The image decoder (official: 1-layer resampler, 77 queries, 1024 wide = the U-Net's context width, 16 heads,
    FFN 3072, no output Linear; MMFS on the U-Net's skips: 16 heads x 64, 4 levels, 8 points, offsets +-1; the null
    condition for 10% of images; loss weight 10)."""
    queries: int = 77
    dim: int = 1024
    layers: int = 1
    heads: int = 16
    ffn: int = 3072
    init_std: float = 0.02              # resampler Linear weights (official 0.02, BLIP-2's)
    mmfs_heads: int = 16
    mmfs_head_dim: int = 64
    mmfs_points: int = 8
    mmfs_offset_init: float = 1.0
    null_prob: float = 0.1
    loss_weight: float = 10.0


SUB_CONFIGS = {"resampler": ResamplerConfig, "mmfs": LLMMMFSConfig, "decoder": DecoderConfig}


@dataclass
class MMIConfig:
    # the parts' own configs: dicts of their modules' fields
    vision: dict = field(default_factory=lambda: asdict(CLIPVisionConfig()))   # vit.CLIPVisionConfig fields
    adapter: dict = field(default_factory=dict)                                # vit.ViTAdapter keyword arguments
    llm: dict = field(default_factory=dict)                                    # llm.LLaMAConfig fields
    unet: dict = field(default_factory=lambda: asdict(UNetConfig()))           # unet.UNetConfig fields
    vae: dict | None = field(default_factory=lambda: asdict(VAEConfig()))      # None: diffusion in pixel space
    schedule: dict = field(default_factory=dict)                               # diffusion.NoiseSchedule arguments
    tokenizer: str = "byte"            # "byte" (ByteTokenizer), "world" (assets/world.model), "llama" (the LLM
                                       # folder's tokenizer.model) or a SentencePiece tokenizer.model path
    pad_id: int | None = None          # None: the tokenizer's own (official: 31999)
    # the new modules, as the paper's Fig. 2 groups them
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)       # the image tokenizer's
    mmfs: LLMMMFSConfig = field(default_factory=LLMMMFSConfig)                 # in the LLM
    decoder: DecoderConfig = field(default_factory=DecoderConfig)              # the image decoder
    # what the parts agree on: the token format, the image size, how many images a token may look back at (the
    # LLM MMFS's image-index table: 50 rows officially, row 0 for invisible images)
    n_image_tokens: int = 64
    image_size: int = 512
    max_images: int = 49
    use_mmfs: bool = True               # False: the ablation without MMFS, in the LLM and in the U-Net (paper Table 6)
    # what trains (official: ViT, LLaMA, LM head and VAE frozen; the tiny world trains everything from scratch)
    freeze_vit: bool = True
    freeze_llm: bool = True
    freeze_unet: bool = False           # official: the U-Net fine-tunes at lr_unet; the tiny world keeps its tiny SD's
    lr: float = 1e-4
    lr_unet: float = 1e-5
    lr_offsets: float = 1e-5            # every sampling_offsets layer (LLM, U-Net and adapter MMFS)
    components: dict | None = None      # official folders this model was assembled from (set by from_components)

    def __post_init__(self):  # sub-configs read back from JSON (config.json, presets) are dicts
        for name, cls in SUB_CONFIGS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))

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
                if sub in SUB_CONFIGS:
                    d.setdefault(sub, {})
                    if key not in {f.name for f in fields(SUB_CONFIGS[sub])}:
                        raise KeyError(f"unknown config field {k!r}")
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
        n_image_tokens=16, max_images=8, image_size=32,
        resampler=dict(dim=64, layers=2, heads=4, ffn=256, dropout=0.0,
                       init_std=0.125, out_std=0.1),  # tiny-only: from scratch the media must get through from step 0
        mmfs=dict(every=2, heads=4, head_dim=16, points=2, offset_init=1.0,
                  gate_init=1.0),  # tiny-only: open gates (a zero-init gate stays near 0 for hundreds of steps)
        decoder=dict(queries=16, dim=64, heads=4, ffn=256, mmfs_heads=4, mmfs_head_dim=16, mmfs_points=2,
                     init_std=0.25),  # tiny-only: the condition depends on the caption from step 0 (see README)
        freeze_vit=False, freeze_llm=False, lr=1e-3, lr_unet=1e-3,
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

    def heads(self, t):  # (B, L, dim) -> (B, n_heads, L, head_dim)
        return t.view(t.shape[0], -1, self.n_heads, t.shape[-1] // self.n_heads).transpose(1, 2)

    def queries_keys(self, x, kv):
        """The (qk-normed) queries and keys, split into heads."""
        return self.q_norm(self.heads(self.q(x))), self.k_norm(self.heads(self.k(kv)))

    def forward(self, x, kv, mask=None):  # x (B, T, dim), kv (B, S, kv_dim), mask (B, S) True = attend
        B, T, C = x.shape
        (q, k), v = self.queries_keys(x, kv), self.heads(self.v(kv))
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

    def forward(self, media, mask=None):  # media (B, S, media_dim), mask (B, S) -> (B, n, out_dim)
        x = self.drop(self.ln_q(self.queries)).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            x = recompute_in_backward(self, layer, x, media, mask)
        return self.out(x)


# -----------------------------------------------------------------------------
# MMFS inside the LLM


def document_ids(tokens, bos_id):
    """[B, T] token ids -> the document index of each position: a document starts at each <s>."""
    return (tokens == bos_id).long().cumsum(-1)


def sees(token_doc, token_pos, image_doc, image_pos):
    """The visibility rule (official): a token sees an image of its own document once past the image's BoI (from its
    first <|image|> on; the BoI itself does not). [B, T] documents / positions of tokens and [B, N] of images (their
    BoI) -> [B, T, N] bool."""
    return (token_doc[:, :, None] == image_doc[:, None, :]) & (token_pos[:, :, None] > image_pos[:, None, :])


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
        self.mmfs = MMFS(dim, vis_dim, cfg.mmfs.heads, 3, cfg.mmfs.points, head_dim=cfg.mmfs.head_dim, out_dim=dim,
                         offset_init=cfg.mmfs.offset_init, max_images=cfg.max_images, base_grid=grid)
        self.gate = nn.Parameter(torch.full((1,), float(cfg.mmfs.gate_init)))

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
# The image tokenizer (Fig. 2, left): image -> image tokens for the LLM + multi-scale maps for MMFS


def flatten_maps(maps):
    """list of L maps [N, Dv, h, w] -> (values [N, sum h*w, Dv], shapes [L, 2]): the layout MMFS samples from."""
    values = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    return values, torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=values.device)


class VisualTokenizer(nn.Module):
    """CLIP ViT + ViT-Adapter -> 4 multi-scale maps; its tokens at the ViT's width Dv: Linear -> LN, + 2D sin-cos ->
    LN -> Perceiver resampler (its cross-attention maps Dv to resampler.dim) -> n_image_tokens embeddings of the LLM's
    width (official VisualTokenizer: pos_proj, pos_ln, post_ln, perceiver_resampler, proj)."""

    def __init__(self, cfg: MMIConfig, llm_dim, vit=None):
        super().__init__()
        vit = vit or VisionTransformer(CLIPVisionConfig(**cfg.vision))
        self.adapter = ViTAdapter(vit, **cfg.adapter)
        Dv, self.grid = vit.cfg.hidden_size, vit.cfg.image_size // vit.cfg.patch_size
        self.proj = nn.Linear(Dv, Dv)
        self.proj_norm, self.pos_norm = nn.LayerNorm(Dv, eps=1e-6), nn.LayerNorm(Dv, eps=1e-6)
        r = cfg.resampler
        self.resampler = Resampler(cfg.n_image_tokens, r.dim, r.layers, r.heads, Dv, llm_dim, r.ffn, r.cross_every,
                                   qk_norm=True, dropout=r.dropout, out_std=r.out_std, init_std=r.init_std)

    @property
    def vit(self):
        return self.adapter.vit

    def forward(self, images01):
        """[N, 3, H, W] in [0, 1] -> (embeddings [N, n_image_tokens, D] for the <|image|> slots, 4 maps
        [N, Dv, h, w], finest first)."""
        tokens, maps = self.adapter(images01)
        x = self.proj_norm(self.proj(tokens.to(self.proj.weight.dtype)))         # (N, 1+g*g, Dv)
        g, Dv = self.grid, x.shape[-1]
        pos = torch.cat([x.new_zeros(1, Dv), sincos_2d(g, g, Dv, x.device, x.dtype)])  # class token: no position
        return self.resampler(self.pos_norm(x + pos)), maps


# -----------------------------------------------------------------------------
# The image decoder (Fig. 2, right): LLM states + the previous image's maps -> condition -> U-Net with MMFS taps


@dataclass
class DecoderContext:
    """What the U-Net's MMFS taps read while n images are denoised: each one's previous image of its document
    (official: the decoder looks back at that one image only)."""
    values: torch.Tensor         # (n, 1, S, Dv) the previous image's four adapter levels, flattened (any values
                                 # where there is none: never read)
    shapes: torch.Tensor         # (4, 2) (H, W) of the levels
    has_prev: torch.Tensor       # (n,) bool: the image has a previous image
    projected: list | None = None  # per tap: its project_values of values[has_prev], when already known (sampling
                                   # projects once for all steps)

    def doubled(self):
        """The same context for a batch doubled (the conditional and unconditional halves of guidance)."""
        proj = None if self.projected is None else [torch.cat([p, p]) for p in self.projected]
        return DecoderContext(torch.cat([self.values, self.values]), self.shapes,
                              torch.cat([self.has_prev, self.has_prev]), proj)


class UNetTap(nn.Module):
    """MMFS on one U-Net skip (or the mid block): LayerNorm(skip) + 2D sin-cos queries read the previous image's
    four levels (their own LayerNorm), through a ControlNet-style zero-initialised 1x1 conv (a per-pixel Linear:
    the same, faster on a CPU) added to the skip (official "MMFS in the UNet")."""

    def __init__(self, channels, vis_dim, cfg: MMIConfig, grid):
        super().__init__()
        self.norm_q, self.norm_v = nn.LayerNorm(channels, eps=1e-6), nn.LayerNorm(vis_dim, eps=1e-6)
        d = cfg.decoder
        self.mmfs = MMFS(channels, vis_dim, d.mmfs_heads, 4, d.mmfs_points, head_dim=d.mmfs_head_dim,
                         offset_init=d.mmfs_offset_init, max_images=1, base_grid=grid)
        self.zero = nn.Linear(channels, channels)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def project_values(self, values):
        return self.mmfs.project_values(self.norm_v(values))

    def forward(self, f, latent, projected, shapes, seen):
        """f [B, C, H, W]; projected: values of the previous images of f[seen] -> f + zero-conv(MMFS)."""
        B, C, H, W = f.shape
        y = self.mmfs.output_proj.bias.expand(B, H * W, C)  # no previous image: MMFS reads only the null key
        if len(seen):  # compute MMFS just for the images that have a previous image (exactly the same result)
            pos = sincos_2d_resized(latent, H, W, C, f.device, f.dtype)  # one latent-size table, resized
            q = self.norm_q(f[seen].flatten(2).transpose(1, 2)) + pos      # (b, H*W, C)
            y = y.index_copy(0, seen, self.mmfs(q, pixel_centres(H, W, f.device), projected, shapes,
                                                q.new_ones(len(seen), H * W, 1, dtype=torch.bool),
                                                value_projected=True))
        return f + self.zero(y).transpose(1, 2).reshape(B, C, H, W).to(f.dtype)


class ImageDecoder(nn.Module):
    """LLM states from the document's <s> to an image's BoI, reversed (BoI first) -> Linear + 1D sin-cos ->
    resampler -> U-Net context (the null condition replaces it for null_prob of the images in training); the U-Net
    denoises with MMFS taps on its skips reading the previous image; VAE and noise schedule around it."""

    def __init__(self, cfg: MMIConfig, llm_dim, vis_dim, unet=None, vae=None):
        super().__init__()
        self.cfg, d = cfg, cfg.decoder
        self.unet = unet or UNet(UNetConfig.from_dict(cfg.unet))
        C = self.unet.cfg.cross_attention_dim
        if d.dim != C:
            raise ValueError(f"decoder.dim {d.dim} must be the U-Net's cross-attention width {C} (official: the "
                             "decoder resampler has no output Linear)")
        self.context_proj = nn.Linear(llm_dim, llm_dim)
        self.resampler = Resampler(d.queries, C, d.layers, d.heads, llm_dim, ffn=d.ffn, init_std=d.init_std)
        self.null_cond = nn.Parameter(torch.randn(d.queries, C))  # official: SD's text encoding of ""
        self.vae = vae if vae is not None else AutoencoderKL(VAEConfig.from_dict(cfg.vae)) if cfg.vae else None
        self.latent = cfg.image_size // (8 if self.vae is not None else 1)
        self.taps = nn.ModuleList(UNetTap(c, vis_dim, cfg, (self.latent // s, self.latent // s))
                                  for c, s in (self.unet.taps if cfg.use_mmfs else []))
        self.schedule = NoiseSchedule(**cfg.schedule)

    def condition(self, h, rows, starts, ends):
        """States h [B, T, D]; image i's document is row rows[i] from starts[i] to its BoI at ends[i] ->
        U-Net context [n, dec_queries, C]."""
        lens = ends - starts + 1
        L = int(lens.max())
        ar = torch.arange(L, device=h.device)
        idx = (ends[:, None] - ar).clamp(min=0)                                      # (n, L): BoI, BoI-1, ...
        x = self.context_proj(h[rows[:, None], idx].to(self.context_proj.weight.dtype))  # (n, L, D)
        x = x + sincos_1d(L, x.shape[-1], x.device, x.dtype)
        return self.resampler(x, ar < lens[:, None])

    def context(self, values, shapes, prev):
        """All images' four levels [N, S, Dv] (flatten_maps) and, per image to draw, the index of its previous
        image or -1 -> DecoderContext."""
        return DecoderContext(values[prev.clamp(min=0)][:, None], shapes, prev >= 0)

    def project(self, ctx: DecoderContext):
        """ctx with each tap's projected values filled in (once for all denoising steps)."""
        values = ctx.values[ctx.has_prev]
        return DecoderContext(ctx.values, ctx.shapes, ctx.has_prev, [tap.project_values(values) for tap in self.taps])

    def denoise(self, x, t, cond, ctx: DecoderContext):
        """The U-Net's prediction for x_t at timesteps t [n], with the MMFS residuals on its skips and mid block."""
        skips, mid, emb = self.unet.down(x, t, cond)
        if not self.taps:  # use_mmfs=False: the plain U-Net
            return self.unet.up(skips, mid, emb, cond)
        seen = ctx.has_prev.nonzero(as_tuple=True)[0]
        projected = ctx.projected if ctx.projected is not None else self.project(ctx).projected
        feats = [tap(f, self.latent, v, ctx.shapes, seen) for f, tap, v in zip([*skips, mid], self.taps, projected)]
        return self.unet.up(feats[:-1], feats[-1], emb, cond)

    def random_draws(self, n, device):
        """The diffusion loss's randomness for n images, in one method so that a test can replay the authors' draws:
        (uniform [n] for the null-condition draw, the VAE posterior's standard-normal draw (None in pixel space),
        noise, timesteps [n])."""
        shape = (n, self.unet.cfg.in_channels, self.latent, self.latent)
        uniform = torch.rand(n, device=device)
        vae_eps = torch.randn(shape, device=device) if self.vae is not None else None
        noise, t = torch.randn(shape, device=device), torch.randint(0, self.schedule.N, (n,), device=device)
        return uniform, vae_eps, noise, t

    def loss(self, cond, images01, ctx: DecoderContext):
        """Per-image diffusion loss [n] (mean squared error of the prediction, official) of images [n, 3, H, W] in
        [0, 1] given their conditions [n, Q, C]."""
        uniform, vae_eps, noise, t = self.random_draws(len(images01), cond.device)
        if self.training:  # classifier-free guidance: the null condition for null_prob of the images
            drop = (uniform < self.cfg.decoder.null_prob)[:, None, None]
            cond = torch.where(drop, self.null_cond.to(cond.dtype), cond)
        with torch.no_grad():
            x0 = self.to_latent(images01, vae_eps)
        noise = noise.to(x0)
        pred = self.denoise(self.schedule.add_noise(x0, noise, t), t, cond, ctx)
        return (pred.float() - self.schedule.target(x0, noise, t).float()).square().flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, cond, ctx: DecoderContext, steps=25, sampler="ddim", guidance=2.0, generator=None):
        """cond [n, Q, C] -> images [n, 3, H, W] in [0, 1]. The unconditional branch of guidance uses the null
        condition and the same MMFS context (official), its values projected once for all steps."""
        n = cond.shape[0]
        noise = torch.randn(n, self.unet.cfg.in_channels, self.latent, self.latent, generator=generator,
                            device=cond.device, dtype=self.unet.conv_in.weight.dtype)
        ctx = self.project(ctx)
        if guidance == 1.0:
            fn = lambda x, t: self.denoise(x, t, cond, ctx)  # noqa: E731
        else:
            both, ctx2 = torch.cat([cond, self.null_cond.to(cond.dtype).expand(n, -1, -1)]), ctx.doubled()
            fn = guided(lambda x, t: self.denoise(x, t, both, ctx2), guidance)
        return self.from_latent(self.schedule.sample(fn, noise, steps=steps, sampler=sampler, generator=generator))

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


# -----------------------------------------------------------------------------
# The model (Fig. 2): image tokenizer, LLM with MMFS, text head, image decoder


class MMI(nn.Module):
    def __init__(self, cfg: MMIConfig, vit=None, llm=None, unet=None, vae=None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm or LLaMA(LLaMAConfig(**cfg.llm))
        D, V = self.llm.cfg.dim, self.llm.cfg.vocab_size
        self.visual_tokenizer = VisualTokenizer(cfg, D, vit)
        Dv, grid = self.visual_tokenizer.vit.cfg.hidden_size, self.visual_tokenizer.grid
        # LLM: MMFS in layers 0, k, 2k, ...; BoI embedding = frozen base row + learnable zero-init vector;
        # LM head + 2 rows (NEW_ROW_OFFSET, BOI_INIT_LOGIT above)
        for i in range(0, self.llm.cfg.n_layers, cfg.mmfs.every) if cfg.use_mmfs else []:
            self.llm.insert(i, GatedMMFS(D, Dv, cfg, self.llm.cfg.norm_eps, grid))
        self.register_buffer("boi_base", torch.randn(D) * 0.02)  # stands for the resized table's new row
        self.boi = nn.Parameter(torch.zeros(D))
        self.new_head = nn.Linear(D, 2)
        nn.init.zeros_(self.new_head.weight)
        nn.init.constant_(self.new_head.bias, BOI_INIT_LOGIT - NEW_ROW_OFFSET)
        # the frozen bias of the extended LM head (official text_decoder.head.bias): 0 on the LLM's rows
        self.head_bias = nn.Parameter(torch.cat([torch.zeros(V), torch.full((2,), NEW_ROW_OFFSET)]),
                                      requires_grad=False)
        self.image_decoder = ImageDecoder(cfg, D, Dv, unet, vae)
        self.freeze()

    def freeze(self):
        """The paper's freezing: ViT, LLaMA (embeddings, blocks, LM head) and VAE frozen; the rest trains."""
        if self.cfg.freeze_vit:
            self.visual_tokenizer.vit.requires_grad_(False)
        if self.cfg.freeze_llm:
            for name, p in self.llm.named_parameters():
                p.requires_grad_(".inserted." in name)
        if self.image_decoder.vae is not None:
            self.image_decoder.vae.requires_grad_(False)
        if self.cfg.freeze_unet:  # the U-Net only: its MMFS taps are new modules and train
            self.image_decoder.unet.requires_grad_(False)

    @functools.cached_property
    def tok(self):
        """The model's tokenizer (tokenizer.mmi_tokenizer): the LLM's own with BoI and <|image|> appended."""
        llm_path = (self.cfg.components or {}).get("llm")
        tok = mmi_tokenizer(self.cfg.tokenizer, self.llm.cfg.vocab_size, self.cfg.pad_id, llm_path)
        assert (tok.boi_id, tok.image_id) == (self.cfg.boi_id, self.cfg.image_id)
        return tok

    # --- a batch's sequence ---------------------------------------------------------------------------------------
    def layout(self, tokens, doc_ids=None) -> ImageLayout:
        """Where the images are in a [B, T] batch and what each token may see: see ImageLayout."""
        B, T = tokens.shape
        bos, dev = self.tok.bos_id, tokens.device
        if doc_ids is None:
            doc_ids = document_ids(tokens, bos)
        rows, pos = (tokens == self.cfg.boi_id).nonzero(as_tuple=True)  # (N,), (N,)
        N = rows.shape[0]
        doc = doc_ids[rows, pos]
        start = (doc_ids[rows] == doc[:, None]).long().argmax(1)         # first position of the image's document
        first = torch.searchsorted(rows, rows)                           # index of each row's first image
        slot = torch.arange(N, device=dev) - first                       # image index within its row
        n_max = int(slot.max()) + 1 if N else 0
        img_doc = torch.full((B, n_max), -2, dtype=doc.dtype, device=dev).index_put((rows, slot), doc)
        img_pos = torch.full((B, n_max), T, dtype=pos.dtype, device=dev).index_put((rows, slot), pos)
        visible = sees(doc_ids, torch.arange(T, device=dev)[None], img_doc, img_pos)  # (B, T, n_max)
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
            doc = document_ids(tokens, bos) if doc_ids is None else doc_ids
            boi = (tokens == self.cfg.boi_id).long().cumsum(1)                    # BoIs up to and including t
            at_start = torch.where(doc[:, 1:] != doc[:, :-1], boi[:, :-1], 0)     # BoIs before each document
            first = torch.cat([boi.new_zeros(boi.shape[0], 1), at_start], 1).cummax(1).values
            ignore |= (boi == first)[:, 1:]                                       # none in the document so far
        return tgt.masked_fill(ignore, -100)

    # --- the whole model ----------------------------------------------------------------------------------------
    def llm_inputs(self, tokens, images=None, doc_ids=None):
        """tokens [B, T], images [N, 3, H, W] in [0, 1] (one per BoI, row-major) -> (input embeddings [B, T, D], the
        LLM's VisualContext or None, the ImageLayout, every image's four levels for the decoder: (values [N, S, Dv],
        shapes) or None)."""
        lay = self.layout(tokens, doc_ids)
        N = lay.rows.shape[0]
        if (0 if images is None else images.shape[0]) != N:
            raise ValueError(f"batch has {N} BoI tokens but {0 if images is None else images.shape[0]} images")
        emb = ctx = maps = None
        if N:
            emb, maps = self.visual_tokenizer(images)
            ctx = self.visual_context(lay, *flatten_maps(maps[1:]), tokens.shape[0])  # levels 32/16/8 px
            maps = flatten_maps(maps)                                                 # all four levels
        return self.embed(tokens, emb), ctx, lay, maps

    def hidden_states(self, tokens, images=None, doc_ids=None):
        """-> (final LLM states [B, T, D], the ImageLayout, every image's four levels), as llm_inputs."""
        x, ctx, lay, maps = self.llm_inputs(tokens, images, doc_ids)
        return self.llm.forward_hidden(embeds=x, ctx=ctx), lay, maps                   # (B, T, D)

    def forward(self, batch, draw=True):
        """The two losses of the paper (section 3.3): next-token cross-entropy on text, and the diffusion loss of
        every image that has text before it, conditioned on the LLM states up to its BoI.
        batch: tokens, images; optional doc_ids, images_dec [N, 3, S, S] (the decoder's own crops; default: images
        resized) and pairs (True: the image-text-pair text rule of text_targets).
        Also returned: "cond" [n, Q, C], the conditions of the images with context (None if none), and "drawn" [n],
        their indices in images (for distill.drawn_loss); draw=False skips the U-Net (image loss 0)."""
        tokens, images = batch["tokens"], batch.get("images")
        h, lay, maps = self.hidden_states(tokens, images, batch.get("doc_ids"))
        targets = self.text_targets(tokens, batch.get("pairs", False), batch.get("doc_ids"))
        text_loss = F.cross_entropy(self.logits(h[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        n_text = int((targets != -100).sum())
        if n_text == 0:
            text_loss = h.sum() * 0.0
        drawn = lay.has_context.nonzero(as_tuple=True)[0]  # no image loss when the context is only <s> BoI
        image_loss, cond = text_loss.new_zeros(()), None
        if len(drawn):
            cond = self.image_decoder.condition(h, lay.rows[drawn], lay.start[drawn], lay.pos[drawn])
        if len(drawn) and draw:
            ctx = self.image_decoder.context(*maps, lay.prev[drawn])
            losses = self.image_decoder.loss(cond, batch.get("images_dec", images)[drawn], ctx)
            image_loss = losses.sum() / len(lay.rows)  # a mean over ALL images, those without context as zeros
        return dict(loss=text_loss + self.cfg.decoder.loss_weight * image_loss, text_loss=text_loss.detach(),
                    image_loss=image_loss.detach(), n_text=n_text, n_images=len(drawn), cond=cond, drawn=drawn)

    # --- training helpers ---------------------------------------------------------------------------------------
    def param_groups(self, weight_decay=0.05, lr=None, lr_unet=None, lr_offsets=None):
        """AdamW groups (official rules): lr_offsets for every sampling_offsets layer, lr_unet for the U-Net, lr for
        the rest; no weight decay on biases, nn.LayerNorm parameters, MMFS gates and sampling offsets. Decayed, as
        officially: RMSNorm and GroupNorm weights, the SPM's channels-first LayerNorms (another class there), the
        adapter's gammas, the BoI vector, embeddings and queries."""
        lr, lr_unet = lr or self.cfg.lr, lr_unet or self.cfg.lr_unet
        lr_offsets = lr_offsets or self.cfg.lr_offsets
        unet_ids = {id(p) for p in self.image_decoder.unet.parameters()}
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
        for module in (self.visual_tokenizer.vit, self.visual_tokenizer.resampler, self.llm, self.image_decoder.unet):
            module.gradient_checkpointing = on

    def param_counts(self):
        """{component: (total, trainable)} parameter counts, split as the authors' modules are. The ViT's
        post-LayerNorm (in the CLIP file, never used; the authors' model has none) is not counted."""
        vt, dec, llm = self.visual_tokenizer, self.image_decoder, self.llm
        mmfs = [m for b in llm.layers if b.inserted is not None for m in [b.inserted]]
        parts = dict(
            vit=[p for n, p in vt.vit.named_parameters() if "post_layernorm." not in n],
            adapter=[p for n, p in vt.adapter.named_parameters() if not n.startswith("vit.")],
            resampler=[*vt.proj.parameters(), *vt.proj_norm.parameters(), *vt.pos_norm.parameters(),
                       *vt.resampler.parameters()],
            llm=[p for n, p in llm.named_parameters() if not n.startswith("lm_head.") and ".inserted." not in n],
            llm_mmfs=[p for m in mmfs for p in m.parameters()],
            text_head=[*llm.lm_head.parameters(), self.head_bias, *self.new_head.parameters()],
            boi=[self.boi],
            decoder_context=[*dec.context_proj.parameters(), *dec.resampler.parameters(), dec.null_cond],
            unet=list(dec.unet.parameters()),
            unet_mmfs=list(dec.taps.parameters()),
            vae=list(dec.vae.parameters()) if dec.vae is not None else [])
        return {k: (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))
                for k, ps in parts.items()}
