"""
The released MM-Interleaved checkpoint (the authors' whole-model state_dict, as .bin pickles) -> mmi's names.

    ckpt = released_checkpoint(folder)        # every *.bin of the folder, read lazily (weights_only pickles)
    plan = convert(ckpt, targets)             # {our key: tensor}, strict: every official key is used or ignored
                                              # by a named rule, every shape is checked, errors name the key
    assign(model, plan)                       # one tensor at a time into the model's parameters and buffers

`targets` maps our state-dict keys to the tensors (or meta tensors) they must fill: their shapes decide how the
official tensors are cut (the null-slot rows of each MMFS, the rows of the image-index embeddings).
The authors' module names are in RULES (official.md "The released checkpoint").
"""
import re
from pathlib import Path

import torch

from weights import CheckpointError, open_checkpoint

VT = "visual_tokenizer."
VM = VT + "encoder.vision_model."


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


def drop_null_slots(t, shape):
    """MMFS attention logits: the official Linear has one extra output per (head, level), the null slot whose logit
    is overwritten by a constant; mmfs.MMFS adds the same null key itself. Rows (h, l, p+1) -> (h, l, p)."""
    heads_levels = t.shape[0] - shape[0]  # official M*L*(P+1) rows, ours M*L*P
    return t.unflatten(0, (heads_levels, -1))[:, :-1].flatten(0, 1)


def first_rows(t, shape):
    """Image-index embedding: row r = the r-th most recent visible image (0 = invisible, never attended). Ours holds
    only the rows a token can reach (official asserts index < rows)."""
    if shape[0] > t.shape[0]:
        raise ValueError(f"needs {shape[0]} rows, the checkpoint has {t.shape[0]}")
    return t[:shape[0]]


# -----------------------------------------------------------------------------
# Key rules: (official regex, our key (re.sub template) or None = ignored, transform or a check for ignored keys)


def spm_stem(m):  # official stem = [conv, LN, ReLU] x 3 + maxpool in one Sequential; ours nests each triple
    return f"adapter.spm.stem.{int(m[1]) // 3}.{int(m[1]) % 3}.{m[2]}"


RULES = [
    # ViT + adapter (vit.ViTAdapter)
    (re.escape(VM) + r"adapter_spm\.stem\.(\d+)\.(weight|bias)", spm_stem, same),
    (re.escape(VM) + r"adapter_spm\.(.*)", r"adapter.spm.\1", same),
    (re.escape(VM) + r"adapter_interactions\.(.*)\.dwconv\.dwconv\.(.*)", r"adapter.interactions.\1.dwconv.\2", same),
    (re.escape(VM) + r"adapter_interactions\.(.*)", r"adapter.interactions.\1", same),
    (re.escape(VM) + r"adapter_level_embed", "adapter.level_embed", same),
    (re.escape(VM) + r"adapter_up\.(.*)", r"adapter.up.\1", same),
    (re.escape(VM) + r".*position_ids", None, None),  # index buffers
    (re.escape(VM) + r"(embeddings|pre_layrnorm|encoder)\.(.*)", r"adapter.vit.\1.\2", same),
]


def convert_key(key):
    """-> (our key or None if ignored, transform or check), or KeyError when no rule knows the key."""
    for pattern, target, fn in RULES:
        m = re.fullmatch(pattern, key)
        if m:
            if target is None:
                return None, fn
            return (target(m) if callable(target) else m.expand(target)), fn
    raise KeyError(key)


def convert(ckpt, targets, where=str):
    """ckpt: key -> tensor (lazy); targets: our key -> tensor whose shape is expected.
    -> {our key: tensor}: views of the (memory-mapped) checkpoint tensors where the transform allows, so nothing is
    read before assign(). CheckpointError, naming the key, for an official key no rule knows, a failed check of an
    ignored one, a key of ours the model lacks or gets twice, a wrong shape. Our keys left out of the plan keep
    their values (the caller says which may: those from the component folders)."""
    plan = {}
    for key in ckpt:
        try:
            ours, fn = convert_key(key)
        except KeyError:
            raise CheckpointError(f"{where(key)}: no rule for released key {key!r}") from None
        if ours is None:
            if fn is not None:
                fn(ckpt[key], key)
            continue
        if ours not in targets:
            raise CheckpointError(f"{where(key)}: released key {key!r} maps to {ours!r}, which the model lacks")
        if ours in plan:
            raise CheckpointError(f"{where(key)}: released key {key!r} maps to {ours!r} a second time")
        shape = tuple(targets[ours].shape)
        try:
            value = fn(ckpt[key], shape)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{where(key)}: released key {key!r} -> {ours!r}: {e}") from None
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{where(key)}: released key {key!r} has shape {tuple(value.shape)} "
                                  f"({ours!r} expects {shape})")
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
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(value.contiguous(), requires_grad=target.requires_grad)
        else:
            owner._buffers[attr] = value.contiguous()
    return module
