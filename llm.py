"""
LLaMA-family decoder (LLaMA 1/2, Vicuna v1.3/v1.5, grouped-query variants) in one small file.

RMSNorm (fp32), rotary embeddings in the half-split ("rotate_half") convention that HF checkpoints use, SwiGLU MLP,
grouped-query attention with F.scaled_dot_product_attention, a static KV cache (prefill + single-token decode),
and an insertion point between self-attention and MLP of any layer, where MM-Interleaved puts its MMFS module:

    model.insert(i, module)   # Block i then does  h = module(h, ctx)  between attention and MLP

Loading (`LLaMA.from_pretrained(folder)`) builds on the meta device and assigns tensors one at a time from single or
sharded safetensors / pytorch_model*.bin, so peak memory stays near one copy of the weights.
"""
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weights import CheckpointError, load_strict, open_checkpoint, read_json, recompute_in_backward, weight_files


@dataclass
class LLaMAConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (no grouped-query attention)
    hidden_dim: int = 11008  # MLP intermediate size
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # lm_head shares the embedding matrix

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        assert self.dim % self.n_heads == 0 and self.n_heads % self.n_kv_heads == 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, c: dict) -> "LLaMAConfig":
        """From a HF LlamaConfig config.json dict (transformers 4.x or 5.x layout)."""
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rope}")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias LLaMA variants are not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}")
        cfg = cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            norm_eps=c["rms_norm_eps"],  # 1e-6 (v1.3) vs 1e-5 (v1.5): always from the file
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            max_seq_len=c.get("max_position_embeddings", 2048),
            tie_embeddings=c.get("tie_word_embeddings", False),
        )
        if c.get("head_dim") not in (None, cfg.head_dim):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads")
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics even under fp16/bf16, then back to the input dtype before the gain (as HF does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd): half-split layout, both halves share a frequency
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    # x (B, H, T, hd); cos/sin (T, hd). Pairs are (i, i + hd/2): the HF "rotate_half" convention.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Static cache: keys/values preallocated for max_len positions; `length` = positions filled so far."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k, v):
        """Write k/v (B, Hkv, T, hd) at positions [length, length+T); return everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, Hkv, start+T, hd)
        if start == 0:
            mask, causal = None, T > 1  # plain causal attention over the T new positions
        elif T == 1:
            mask, causal = None, False  # single-token decode sees every cached position
        else:  # chunked prefill after earlier tokens: query i (absolute start+i) sees keys <= start+i
            mask = torch.arange(start + T, device=x.device) <= start + torch.arange(T, device=x.device)[:, None]
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.inserted = None  # e.g. MMFS: called as h = inserted(h, ctx) between attention and MLP

    def forward(self, h, cos, sin, cache=None, layer=0, ctx=None):
        h = h + self.attn(self.norm1(h), cos, sin, cache, layer)
        if self.inserted is not None:
            h = self.inserted(h, ctx)
        return h + self.mlp(self.norm2(h))


class LLaMA(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        self._init_buffers()

    def _init_buffers(self):
        """Rotary tables: non-persistent, so they are (re)computed here after a meta-device build is loaded."""
        device = self.embed.weight.device
        cos, sin = rotary_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd), fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    def insert(self, layer_idx: int, module: nn.Module):
        self.layers[layer_idx].inserted = module

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        w = self.embed.weight
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)

    def forward_hidden(self, tokens=None, embeds=None, cache=None, ctx=None):
        """tokens (B, T) or embeds (B, T, D) -> final-normed hidden states (B, T, D)."""
        h = self.embed(tokens) if embeds is None else embeds
        T = h.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len {self.rope_cos.shape[0]}")
        cos = self.rope_cos[start : start + T].to(h.dtype)  # (T, hd)
        sin = self.rope_sin[start : start + T].to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = recompute_in_backward(self, layer, h, cos, sin, cache, i, ctx)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, tokens=None, embeds=None, cache=None, ctx=None):
        return self.lm_head(self.forward_hidden(tokens, embeds, cache, ctx))  # (B, T, V)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "LLaMA":
        """A HF LLaMA-family folder: config.json + model*.safetensors or pytorch_model*.bin (single or sharded)."""
        path = Path(path)
        cfg = LLaMAConfig.from_hf(read_json(path / "config.json"))
        try:
            files = weight_files(path, "model")
        except CheckpointError:
            files = weight_files(path, "pytorch_model")
        ckpt = open_checkpoint(files)
        if dtype is None:  # keep the checkpoint's floating dtype (fp16 for Vicuna); the final norm is a cheap read
            dtype = ckpt["model.norm.weight"].dtype if "model.norm.weight" in ckpt else torch.float32
        with torch.device("meta"):
            model = cls(cfg)
        tensors = _HFNames(ckpt, tie=cfg.tie_embeddings)
        load_strict(model, tensors, str(path), dtype=dtype)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight  # assignment replaced both; share one again
        model._init_buffers()
        return model.eval()


# HF key -> our key. Our attribute names are shorter; the map is small and explicit.
_RENAMES = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.norm1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.norm2."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
]


def hf_to_ours(key: str) -> str:
    for pattern, repl in _RENAMES:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


class _HFNames(dict):
    """Our key -> lazy reader of the HF tensor, skipping rotary inv_freq buffers; knows each key's file."""

    def __init__(self, ckpt, tie=False):
        self.ckpt, self.hf = ckpt, {}
        for k in ckpt:
            if k.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved the rotary frequencies; we recompute them
            self.hf[hf_to_ours(k)] = k
        if tie and "lm_head.weight" not in self.hf and "embed.weight" in self.hf:
            self.hf["lm_head.weight"] = self.hf["embed.weight"]  # tied checkpoints store the matrix once
        super().__init__({ours: (lambda k=k: ckpt[k]) for ours, k in self.hf.items()})

    def file_of(self, ours):
        return f"{self.ckpt.file_of(self.hf[ours])} ({self.hf[ours]})"


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, prev=None,
                generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy. prev (B, T): tokens already generated/seen."""
    logits = logits.float()
    if repetition_penalty != 1.0 and prev is not None and prev.numel():
        # CTRL-style: make every already-seen token less likely (divide positive logits, multiply negative ones)
        seen = logits.gather(1, prev)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, prev, seen)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))  # unsort
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LLaMA, tokens, max_new_tokens: int, stop_ids=(), pad_id=None, **sampling):
    """Text-only generation: tokens (B, T) -> (B, T + n). Rows that hit a stop id are padded with pad_id
    (default: the stop id they hit). `sampling`: keyword arguments of sample_next."""
    B, T = tokens.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(tokens, cache=cache)[:, -1]  # prefill
    out, done = tokens, torch.zeros(B, dtype=torch.bool, device=tokens.device)
    fill = torch.zeros(B, dtype=torch.long, device=tokens.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=tokens.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, prev=out, **sampling)
        nxt = torch.where(done, fill, nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        hit = torch.isin(nxt, stop) & ~done
        fill = torch.where(hit, nxt if pad_id is None else torch.full_like(nxt, pad_id), fill)
        done |= hit
        if done.all():
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]  # decode one token
    return out
