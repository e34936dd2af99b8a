"""Building MM-Interleaved from files and saving it: everything that touches the disk, so that mmi.py holds only the
model.

    model = build_model(preset="tiny")                           # random init of a preset
    model = build_model(sd="assets/tiny-sd")                     # the tiny world on a (tiny) Stable Diffusion
    model = build_model(clip=..., llm=..., sd=...)               # official component folders, paper freezing
    model = build_model(released=..., clip=..., llm=..., sd=...) # the authors' released checkpoint (released.py)
    model = build_model(ckpt="out-tiny")                         # a folder written by save() (train.py's out_dir)
    save(model, folder); model = load(folder)                    # model.safetensors + config.json

train.py and sample.py both build through build_model.
"""
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

import released as released_ckpt
from diffusion import NoiseSchedule
from llm import LLaMA
from mmi import MMI, MMIConfig, PRESETS
from unet import AutoencoderKL, UNet
from vit import VisionTransformer
from weights import CheckpointError, check_finite, open_checkpoint, read_json, write_atomically


def build_model(preset="tiny", ckpt="", clip="", llm="", sd="", released="", released_config=None, dtype=None,
                null_cond=None, **overrides):
    """The one way in. ckpt: a saved folder (components: clip / llm / sd override the folders it recorded);
    released: the authors' checkpoint on top of clip / llm / sd; clip + llm + sd: official components; sd alone: a
    tiny Stable Diffusion folder (tiny_sd.py) to build on; nothing: the preset, random. overrides: MMIConfig fields
    ("llm.n_layers"-style for sub-configs)."""
    components = dict(clip=clip, llm=llm, sd=sd)
    if ckpt:
        return load(ckpt, components={k: v for k, v in components.items() if v} or None)
    if released:
        config = released_config or {}
        model = from_components(clip, llm, sd, dtype=dtype, **released_ckpt.overrides(config))
        return released_ckpt.load_released(model, released, config, official_keys(model))
    if clip or llm:
        if not (clip and llm and sd):
            raise ValueError("official components need all of clip, llm and sd folders")
        return from_components(clip, llm, sd, preset, dtype, null_cond, **overrides)
    if sd:
        return on_stable_diffusion(sd, preset, null_cond, **overrides)
    return MMI(MMIConfig.from_name(preset, **overrides))


def from_components(clip, llm, sd, preset="official", dtype=None, null_cond=None, **overrides):
    """Assemble from official folders: a CLIP model folder, a LLaMA-family folder (with tokenizer.model) and a
    Stable Diffusion 2.x pipeline root. ViT and LLaMA load in `dtype` (default: as stored); U-Net and VAE fp32.
    null_cond: optional [dec_queries, C] tensor (official: SD's text encoding of "")."""
    vit = VisionTransformer.from_pretrained(clip, dtype)
    lm = LLaMA.from_pretrained(llm, dtype)  # its sizes (depth, width, heads, key-value heads, vocabulary) from the folder
    unet, schedule = stable_diffusion(sd, preset)
    vae = AutoencoderKL.from_pretrained(sd, torch.float32)
    if "mmfs.every" not in overrides and "mmfs" not in overrides:  # at the paper's depths, whatever the LLM's depth
        overrides["mmfs.every"] = mmfs_every(lm.cfg.n_layers)
    cfg = MMIConfig.from_name(
        preset, vision=asdict(vit.cfg), llm=asdict(lm.cfg), unet=asdict(unet.cfg), vae=asdict(vae.cfg),
        schedule=schedule, components=dict(clip=str(clip), llm=str(llm), sd=str(sd)), **overrides)
    model = MMI(cfg, vit=vit, llm=lm, unet=unet, vae=vae)
    with torch.no_grad():
        model.boi_base.copy_(lm.embed.weight.float().mean(0))  # as a resized embedding table's new row
        if null_cond is not None:
            model.image_decoder.null_cond.copy_(null_cond)
    return model


def mmfs_every(n_layers):
    """MMFS every k-th LLM layer from layer 0, placed as the paper places it relative to depth: every 4th of
    Vicuna-13B's 40 layers (10 of them), so k = n_layers / 10 rounded (32 layers: 3, 22: 2, 40: 4)."""
    return max(1, round(n_layers / 10))


def stable_diffusion(sd, preset):
    """The U-Net (fp32) and the schedule's settings of a Stable Diffusion folder (the preset's schedule if the folder
    has none)."""
    has_schedule = (Path(sd) / "scheduler" / "scheduler_config.json").is_file()
    schedule = NoiseSchedule.from_pretrained(sd).config if has_schedule else PRESETS[preset]["schedule"]
    return UNet.from_pretrained(sd, torch.float32), schedule


def on_stable_diffusion(sd, preset="tiny", null_cond=None, **overrides):
    """The tiny world built as the paper is built: the U-Net and schedule of a pretrained (tiny) Stable Diffusion
    folder (tiny_sd.py), everything else of the preset new; null_cond: SD's text encoding of "" (paper: the null
    condition starts there; default: the folder's text encoder's, when it has one). The result is self-contained:
    save() stores its U-Net too."""
    fixed = [k for k in overrides if k.partition(".")[0] in ("unet", "schedule")]
    if fixed:
        raise ValueError(f"{sd}: the U-Net and schedule come from the folder; cannot override {fixed}")
    unet, schedule = stable_diffusion(sd, preset)
    model = MMI(MMIConfig.from_name(preset, unet=asdict(unet.cfg), schedule=schedule, **overrides), unet=unet)
    if null_cond is not None:
        target = model.image_decoder.null_cond
        if null_cond.shape != target.shape:
            raise ValueError(f"{sd}: the empty caption encodes to {tuple(null_cond.shape)}, the decoder makes "
                             f"{tuple(target.shape)} (dec_queries x context width must match)")
        with torch.no_grad():
            target.copy_(null_cond)
    return model


def official_keys(model: MMI):
    """State-dict keys that come frozen from official component files (not saved by save())."""
    if not model.cfg.components:
        return set()
    vit = "visual_tokenizer.adapter.vit."
    keys = {vit + k for k in model.visual_tokenizer.vit.state_dict()} if model.cfg.freeze_vit else set()
    if model.cfg.freeze_llm:
        keys |= {"llm." + k for k in model.llm.state_dict() if ".inserted." not in k}
    return keys | {"image_decoder.vae." + k for k in model.image_decoder.vae.state_dict()}


def save(model: MMI, path):
    """path/model.safetensors + path/config.json, each written atomically. A model from from_components stores
    everything except the frozen official ViT, LLaMA and VAE tensors (its U-Net is fine-tuned, so it is stored);
    load() reads those from cfg.components again."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    skip, seen, tensors = official_keys(model), set(), {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        v = v.detach().cpu()
        tensors[k] = v.clone() if v.data_ptr() in seen else v.contiguous()  # safetensors refuses shared memory
        seen.add(v.data_ptr())
    write_atomically(path / "model.safetensors", lambda f: save_file(tensors, f))
    write_atomically(path / "config.json", lambda f: Path(f).write_text(json.dumps(asdict(model.cfg), indent=1)))


def load(path, components=None, map_location="cpu"):
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
        model = from_components(comp["clip"], comp["llm"], comp["sd"], **keep)
    else:
        model = MMI(cfg)
    ckpt = open_checkpoint(file)  # the checked reader: a truncated or corrupt file is a CheckpointError
    tensors = {k: ckpt[k] for k in ckpt}
    check_finite(tensors, str(file))  # NaN / inf weights would only show as a silent, blank demo
    expected = model.state_dict()
    for k in official_keys(model):
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
