"""
The released MM-Interleaved checkpoint (the authors' whole-model state_dict, as .bin pickles) -> mmi's names.

    ckpt = released_checkpoint(folder)        # every *.bin of the folder, read lazily (weights_only pickles)
    plan = convert(ckpt, targets)             # {our key: tensor}, strict: every official key is used or ignored
                                              # by a named rule, every shape is checked, errors name the key
    assign(model, plan)                       # one tensor at a time into the model's parameters and buffers
    load_released(model, folder, config, frozen)   # all of it, into a model built from the component folders

`targets` maps our state-dict keys to the tensors (or meta tensors) they must fill: their shapes decide how the
official tensors are cut (the null-slot rows of each MMFS, the rows of the image-index embeddings, the LM head's
new rows). load_released puts it together (checkpoints.build_model(released=...) calls it). The authors' module
names are those of RULES below.
"""
import math
import re
from pathlib import Path

import torch

from vit import CLIP_MEAN, CLIP_STD, sincos_2d
from weights import CheckpointError, assign_tensor, open_checkpoint

THEIR_VT = "visual_tokenizer."                # the authors' visual tokenizer
VM = THEIR_VT + "encoder.vision_model."
VT, AD, ID = "visual_tokenizer.", "visual_tokenizer.adapter.", "image_decoder."  # ours


def released_checkpoint(path):
    """A released-checkpoint folder (all its *.bin, as the authors' load_model_weights reads it) or one file."""
    path = Path(path)
    files = sorted(path.glob("*.bin")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"{path}: no *.bin checkpoint files")
    return open_checkpoint(files)


# -----------------------------------------------------------------------------
# Tensor transforms: official tensor, our target shape -> our tensor


def same(t, shape):
    return t


def reshape(t, shape):  # [1, n, d] queries -> [n, d], 1x1 convs -> Linear, ...
    return t.reshape(shape)


def head_rows(t, shape):  # the first rows of a vocabulary-sized table: the LLM's own tokens
    return t[:shape[0]]


def new_rows(t, shape):  # the rows after the LLM's vocabulary: BoI, <|image|> (the LM head's, folded)
    return t[-shape[0]:]


def boi_row(t, shape):  # the embedding row of BoI (the first new row)
    return t[-2]


def drop_null_slots(t, shape):
    """MMFS attention logits: the official Linear has one extra output per (head, level), the null slot whose logit
    is overwritten by a constant; mmfs.MMFS adds the same null key itself. Rows (h, l, p+1) -> (h, l, p)."""
    heads_levels = t.shape[0] - shape[0]  # official M*L*(P+1) rows, ours M*L*P
    if heads_levels <= 0 or shape[0] % heads_levels:
        raise ValueError(f"{tuple(t.shape)} is not {tuple(shape)} plus one null slot per (head, level)")
    return t.unflatten(0, (heads_levels, -1))[:, :-1].flatten(0, 1)


def first_rows(t, shape):
    """Image-index embedding: row r = the r-th most recent visible image (0 = invisible, never attended). Ours holds
    only the rows a token can reach (official asserts index < rows)."""
    if shape[0] > t.shape[0]:
        raise ValueError(f"needs {shape[0]} rows, the checkpoint has {t.shape[0]}")
    return t[:shape[0]]


# Checks of the ignored constants (requires_grad=False tensors of the official model that mmi computes)
def zeros(t):
    return bool((t == 0).all())


def sincos_table(t):  # [(cls +) s*s, dim] 2D sin-cos, rows first (vit.sincos_2d); a class row is zero
    n, dim = t.shape
    s = math.isqrt(n)
    cls, grid = (t[:1], t[1:]) if s * s != n else (t[:0], t)
    s = math.isqrt(grid.shape[0])
    return zeros(cls) and torch.allclose(grid.float(), sincos_2d(s, s, dim), atol=1e-5, rtol=0)


def clip_constant(values):
    return lambda t: torch.allclose(t.float().flatten(), torch.tensor(values))


# -----------------------------------------------------------------------------
# Key rules: official regex -> [(our key: a re.Match.expand template or a function of the match, transform)],
# [] = ignored once its check (if any) passes. The first rule that matches wins.


def qformer(official, ours):
    """A transformers Blip2QFormerModel (+ the perceiver's queries) -> mmi.Resampler."""
    o, q = re.escape(official) + r"blip2qformer\.encoder\.layer\.(\d+)\.", ours + r"layers.\1."
    rules = [(re.escape(official) + r"queries", [(ours + "queries", reshape)]),
             (re.escape(official) + r"blip2qformer\.layernorm\.(.*)", [(ours + r"ln_q.\1", same)])]
    for theirs, attn, ln in [("attention", "self_attn", "ln1"), ("crossattention", "cross_attn", "ln2")]:
        rules += [(o + theirs + r"\.attention\.query\.(.*)", [(q + attn + r".q.\2", same)]),
                  (o + theirs + r"\.attention\.key\.(.*)", [(q + attn + r".k.\2", same)]),
                  (o + theirs + r"\.attention\.value\.(.*)", [(q + attn + r".v.\2", same)]),
                  (o + theirs + r"\.attention\.(q_norm|k_norm)\.(.*)", [(q + attn + r".\2.\3", same)]),
                  (o + theirs + r"\.output\.dense\.(.*)", [(q + attn + r".o.\2", same)]),
                  (o + theirs + r"\.output\.LayerNorm\.(.*)", [(q + ln + r".\2", same)])]
    return rules + [(o + r"intermediate_query\.dense\.(.*)", [(q + r"mlp.0.\2", same)]),
                    (o + r"output_query\.dense\.(.*)", [(q + r"mlp.2.\2", same)]),
                    (o + r"output_query\.LayerNorm\.(.*)", [(q + r"ln3.\2", same)])]


def mmfs(o, ours):
    """The authors' MMFS module (regex prefix `o`, one group: the layer / tap) -> mmfs.MMFS: the per-image query
    Linear is `dynamic_offset_mask`, the image-index embedding `query_relpos`; the logit Linear loses its null slots."""
    return [
        (o + r"ignore_token", [], zeros),  # the null slots' value: zero
        (o + r"dynamic_offset_mask\.(.*)", [(ours + r"query_proj.\2", same)]),
        (o + r"query_relpos\.weight", [(ours + "image_embed.weight", first_rows)]),
        (o + r"attention_weights\.(.*)", [(ours + r"attention_weights.\2", drop_null_slots)]),
        (o + r"(sampling_offsets|value_proj|output_proj)\.(.*)", [(ours + r"\2.\3", same)]),
    ]


TAP = r"image_decoder\.decoder\.mmfs_module\.mmfs_down_blocks\.(\d+)\."
RULES = [
    # ViT + adapter (vit.ViTAdapter); the official stem = [conv, LN, ReLU] x 3 + maxpool in one Sequential
    (re.escape(VM) + r"adapter_spm\.stem\.(\d+)\.(.*)",
     [(lambda m: f"{AD}spm.stem.{int(m[1]) // 3}.{int(m[1]) % 3}.{m[2]}", same)]),
    (re.escape(VM) + r"adapter_spm\.(.*)", [(AD + r"spm.\1", same)]),
    (re.escape(VM) + r"adapter_interactions\.(.*)\.dwconv\.dwconv\.(.*)",
     [(AD + r"interactions.\1.dwconv.\2", same)]),
    (re.escape(VM) + r"adapter_interactions\.(.*)", [(AD + r"interactions.\1", same)]),
    (re.escape(VM) + r"adapter_level_embed", [(AD + "level_embed", same)]),
    (re.escape(VM) + r"adapter_up\.(.*)", [(AD + r"up.\1", same)]),
    (r".*\.position_ids", [], None),  # index buffers
    (re.escape(VM) + r"(embeddings|pre_layrnorm|encoder)\.(.*)", [(AD + r"vit.\1.\2", same)]),
    # image tokens: Linear + LN + sin-cos + LN at the ViT's width, Q-Former, output Linear into the LLM
    (re.escape(THEIR_VT) + r"pos_embed", [], sincos_table),
    (re.escape(THEIR_VT) + r"clip_mean", [], clip_constant(CLIP_MEAN)),
    (re.escape(THEIR_VT) + r"clip_std", [], clip_constant(CLIP_STD)),
    (re.escape(THEIR_VT) + r"pos_proj\.(.*)", [(VT + r"proj.\1", same)]),
    (re.escape(THEIR_VT) + r"pos_ln\.(.*)", [(VT + r"proj_norm.\1", same)]),
    (re.escape(THEIR_VT) + r"post_ln\.(.*)", [(VT + r"pos_norm.\1", same)]),
    (re.escape(THEIR_VT) + r"proj\.(.*)", [(VT + r"resampler.out.\1", same)]),
    *qformer(THEIR_VT + "perceiver_resampler.", VT + "resampler."),
    # LLM: LLaMA with MMFS in every k-th layer; the embedding table has the two new rows (BoI, <|image|>)
    (r"mm_decoder\.embed_tokens\.weight", [("llm.embed.weight", head_rows), ("boi_base", boi_row)]),
    (r"mm_decoder\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", [], None),
    (r"mm_decoder\.layers\.(\d+)\.self_attn\.(.*)", [(r"llm.layers.\1.attn.\2", same)]),
    (r"mm_decoder\.layers\.(\d+)\.input_layernorm\.(.*)", [(r"llm.layers.\1.norm1.\2", same)]),
    (r"mm_decoder\.layers\.(\d+)\.post_attention_layernorm\.(.*)", [(r"llm.layers.\1.norm2.\2", same)]),
    (r"mm_decoder\.layers\.(\d+)\.mlp\.(.*)", [(r"llm.layers.\1.mlp.\2", same)]),
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.gate", [(r"llm.layers.\1.inserted.gate", same)]),
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.norm1\.(.*)", [(r"llm.layers.\1.inserted.norm_q.\2", same)]),
    (r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.norm2\.(.*)", [(r"llm.layers.\1.inserted.norm_v.\2", same)]),
    *mmfs(r"mm_decoder\.layers\.(\d+)\.llama_cross_attn\.attn\.", r"llm.layers.\1.inserted.mmfs."),
    (r"mm_decoder\.norm\.(.*)", [(r"llm.norm.\1", same)]),
    (r"soi_token", [("boi", reshape)]),
    # text head: the frozen LM head of V + 2 rows with bias, and the trainable head_new on the two new rows
    (r"text_decoder\.head\.weight", [("llm.lm_head.weight", head_rows), ("new_head.weight", new_rows)]),
    (r"text_decoder\.head\.bias", [("head_bias", same)]),
    (r"text_decoder\.head_new\.(.*)", [(r"new_head.\1", same)]),
    # image decoder: context projection, Q-Former (no output Linear), null condition, U-Net + MMFS taps, VAE
    (r"context_feat_proj\.(.*)", [(ID + r"context_proj.\1", same)]),
    (r"image_decoder\.neg_prompt_embeds", [(ID + "null_cond", reshape)]),
    *qformer("image_decoder.perceiver_resampler.", ID + "resampler."),
    (r"image_decoder\.decoder\.unet\.(.*)", [(ID + r"unet.\1", same)]),
    (r"image_decoder\.decoder\.vae\.(.*)", [(ID + r"vae.\1", same)]),
    (TAP + r"pos_embed", [], sincos_table),
    (TAP + r"query_norm\.(.*)", [(ID + r"taps.\1.norm_q.\2", same)]),
    (TAP + r"feat_norm\.(.*)", [(ID + r"taps.\1.norm_v.\2", same)]),
    (TAP + r"conv\.(.*)", [(ID + r"taps.\1.zero.\2", reshape)]),  # 1x1 conv -> per-pixel Linear
    *mmfs(TAP + r"mmfs\.", ID + r"taps.\1.mmfs."),
]
FOLD = {"new_head.weight"}  # the LM head's new rows (zero in the release) + head_new: one trainable Linear


def convert_key(key):
    """-> ([(our key, transform)], check or None) of the first rule that matches; KeyError if none does."""
    for pattern, targets, *check in RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return [(t(m) if callable(t) else m.expand(t), fn) for t, fn in targets], (check or [None])[0]
    raise KeyError(key)


def convert(ckpt, targets, where=str):
    """ckpt: key -> tensor (lazy); targets: our key -> tensor whose shape is expected.
    -> {our key: tensor}: views of the (memory-mapped) checkpoint tensors where the transform allows, so nothing is
    read before assign(). CheckpointError, naming the key, for an official key no rule knows, a failed check of an
    ignored one, a key of ours the model lacks or gets twice, a wrong shape. Our keys left out of the plan keep
    their values (the caller says which may: those from the component folders)."""
    plan, folded = {}, set()
    mid = sum(1 for k in ckpt if re.fullmatch(TAP + r"conv\.weight", k))  # the mid block is the tap after them
    for key in ckpt:
        try:
            outs, check = convert_key(key.replace(".mmfs_mid_block.", f".mmfs_down_blocks.{mid}."))
        except KeyError:
            raise CheckpointError(f"{where(key)}: no rule for released key {key!r}") from None
        if not outs and check is not None and not check(ckpt[key]):
            raise CheckpointError(f"{where(key)}: released constant {key!r} is not the one mmi computes")
        for ours, fn in outs:
            if ours not in targets:
                raise CheckpointError(f"{where(key)}: released key {key!r} maps to {ours!r}, which the model lacks")
            shape = tuple(targets[ours].shape)
            try:
                value = fn(ckpt[key], shape)
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{where(key)}: released key {key!r} -> {ours!r}: {e}") from None
            if tuple(value.shape) != shape:
                raise CheckpointError(f"{where(key)}: released key {key!r} has shape {tuple(value.shape)} "
                                      f"({ours!r} expects {shape})")
            if ours in plan and (ours not in FOLD or ours in folded):
                raise CheckpointError(f"{where(key)}: released key {key!r} maps to {ours!r} a second time")
            if ours in plan:
                folded.add(ours)
                value = plan[ours].float() + value.float()
            plan[ours] = value
    return plan


def assign(module, plan, dtype=None):
    """Copy plan (our key -> tensor) into module's parameters and buffers (floating tensors cast to the target's
    dtype or `dtype`), keeping requires_grad."""
    state = module.state_dict(keep_vars=True)
    for name, value in plan.items():
        target = state[name]
        if value.is_floating_point():
            value = value.to(dtype or (target.dtype if not target.is_meta else torch.float32))
        assign_tensor(module, name, value.contiguous(), target.requires_grad)
    return module


def load_released(model, path, config, frozen):
    """Fill `model`, assembled from the component folders the release was trained from (checkpoints.build_model:
    from_components with overrides(config)), with the released checkpoint at `path`. The frozen ViT, LLaMA and VAE
    (`frozen`: their keys) stay those of the component folders, so saving and loading reproduce the model; the
    checkpoint's copies must agree with them. Strict: every key of ours is filled or frozen."""
    check_config(config, model.cfg, "released config")
    ckpt = released_checkpoint(path)
    state = model.state_dict()
    plan = convert(ckpt, state, ckpt.file_of)
    missing = state.keys() - plan.keys() - frozen
    if missing:
        raise CheckpointError(f"{path}: the released checkpoint lacks {sorted(missing)[:10]}")
    for k in sorted(frozen & plan.keys()):  # fp16/bf16 rounding passes, another component does not
        ours, theirs = state[k].float(), plan.pop(k).float()
        if (ours - theirs).abs().max() > 1e-2 * ours.abs().max():
            raise CheckpointError(f"{path}: {k!r} differs from the component folders' (another CLIP / LLaMA / "
                                  "VAE than the release was trained with?)")
    return assign(model, plan)


# -----------------------------------------------------------------------------
# The authors' model settings (their YAML's `model` section, fixture.json's model_config) -> MMIConfig fields


def overrides(mc):
    """MMIConfig fields from the authors' MMInterleaved(**model_config); settings left out keep the release's
    values (mmi's official preset)."""
    vis = (mc.get("visual_tokenizer_config") or {}).get("perceiver_config") or {}
    dec = mc.get("image_decoder_config") or {}
    dq = dec.get("perceiver_config") or {}
    table = [("n_image_tokens", mc, "num_img_token"), ("mmfs.every", mc, "cross_attention_frequency"),
             ("decoder.loss_weight", mc, "loss_img_weight"), ("resampler.dim", vis, "hidden_size"),
             ("resampler.layers", vis, "num_hidden_layers"), ("resampler.heads", vis, "num_attention_heads"),
             ("resampler.ffn", vis, "intermediate_size"), ("resampler.cross_every", vis, "cross_attention_frequency"),
             ("resampler.dropout", vis, "hidden_dropout_prob"), ("image_size", dec, "image_size"),
             ("decoder.null_prob", dec, "uncond_prob"), ("decoder.queries", dq, "num_queries"),
             ("decoder.dim", dq, "hidden_size"), ("decoder.layers", dq, "num_hidden_layers"),
             ("decoder.heads", dq, "num_attention_heads"), ("decoder.ffn", dq, "intermediate_size")]
    out = {field: d[key] for field, d, key in table if d.get(key) is not None}
    if mc.get("image_embed_dim"):  # the LLM's MMFS: 16 heads (hard-coded) over the image features' width
        out["mmfs.head_dim"] = mc["image_embed_dim"] // 16
    if "special_token_dict" in mc:
        out["pad_id"] = mc["special_token_dict"]["pad_token_id"]
    return out


def check_config(mc, cfg, source="config"):
    """What mmi cannot change but the authors' settings could: raise ValueError naming the setting."""
    V, Dv, D = cfg.llm["vocab_size"], cfg.vision["hidden_size"], cfg.llm["dim"]
    g = cfg.vision["image_size"] // cfg.vision["patch_size"]
    vis = (mc.get("visual_tokenizer_config") or {}).get("perceiver_config") or {}
    dec = mc.get("image_decoder_config") or {}
    dq = dec.get("perceiver_config") or {}
    ids = mc.get("special_token_dict") or {}
    wanted = [("txt_vocab_size", mc.get("txt_vocab_size", V + 2), V + 2),
              ("special_token_dict.soi_token_id", ids.get("soi_token_id", V), V),
              ("special_token_dict.image_token_id", ids.get("image_token_id", V + 1), V + 1),
              ("image_embed_dim", mc.get("image_embed_dim", Dv), Dv),
              ("spatial_shapes", list(mc.get("spatial_shapes", [2 * g, g, g // 2])), [2 * g, g, g // 2]),
              ("loss_txt_weight", mc.get("loss_txt_weight", 1.0), 1.0),
              ("visual perceiver num_queries", vis.get("num_queries", cfg.n_image_tokens), cfg.n_image_tokens),
              ("visual perceiver encoder_hidden_size", vis.get("encoder_hidden_size", Dv), Dv),
              ("visual perceiver qk_normalization", vis.get("qk_normalization", True), True),
              ("decoder perceiver encoder_hidden_size", dq.get("encoder_hidden_size", D), D),
              ("image_decoder_config.embed_dim", dec.get("embed_dim", cfg.decoder.dim), cfg.decoder.dim),
              ("decoder perceiver qk_normalization", dq.get("qk_normalization", False), False),
              ("decoder perceiver cross_attention_frequency", dq.get("cross_attention_frequency", 1), 1)]
    for name, got, want in wanted:
        if got != want:
            raise ValueError(f"{source}: {name} = {got!r}; mmi's model needs {want!r}")
