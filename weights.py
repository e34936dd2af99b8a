"""
Lazy, strict checkpoint loading shared by every `from_pretrained` in mmi.

Checkpoints are read one tensor at a time (safetensors `safe_open`, or `torch.load(mmap=True, weights_only=True)` for
pickles) and assigned into a module built on the meta device, so loading a model never holds two copies of it.
Every failure (missing, corrupt or refused file, missing/unexpected/mis-shaped key, NaN/inf values) is a CheckpointError
that names the file and the key. Also the two other mechanics every part shares: writing a file atomically, and
running a block under activation checkpointing (`recompute_in_backward`).
"""
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.utils.checkpoint
from torch import nn

SAFETENSORS_EXTS = (".safetensors",)
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint (or its config) is missing, corrupt, or does not match the model."""


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# transformers writes model.safetensors but pytorch_model.bin (either may be sharded); diffusers keeps one stem
_TRANSFORMERS = ("model.safetensors", "pytorch_model.bin")
_FILE_NAMES = {"model": _TRANSFORMERS, "pytorch_model": _TRANSFORMERS}


def weight_files(folder, stem: str) -> list[Path]:
    """The weight files of `stem` in `folder`: single file or shards listed by an index, safetensors preferred.
    stem "model" or "pytorch_model" means transformers' names (model.safetensors, pytorch_model.bin); any other
    stem (diffusers' "diffusion_pytorch_model") means stem.safetensors, stem.bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    names = _FILE_NAMES.get(stem, (f"{stem}.safetensors", f"{stem}.bin"))
    for name in names:
        single, index = folder / name, folder / f"{name}.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]  # unique, in order
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
            return shards
    raise CheckpointError(f"{folder}: no weights file: expected {' or '.join(names)} "
                          f"(or shards listed by {' / '.join(n + '.index.json' for n in names)})")


def _load_pickle(f: str):
    """torch.load(weights_only=True), memory-mapped when the file is in the zip format; CheckpointError otherwise."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # a broken zip archive
                raise CheckpointError(f"{f}: cannot load ({e})") from None
        with warnings.catch_warnings():  # legacy (non-zip) format or not torch's at all: no mmap, read whole
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise before the refusal
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything beyond plain tensors and containers
        found, detail = re.search(r"GLOBAL (\S+)", str(e)), re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        why = f"it pickles {found.group(1)}" if found else detail.group(1).strip() if detail else type(e).__name__
        raise CheckpointError(
            f"{f}: refused by torch.load(weights_only=True): not a plain tensor pickle ({why}). "
            "Only plain tensor pickles are loaded; use the .safetensors version of this checkpoint."
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # EOFError when truncated, "Invalid magic number" for a pickle torch.save did not write
        raise CheckpointError(f"{f}: cannot load, corrupt or not a torch.save file ({type(e).__name__}: {e})") from None


class Checkpoint(Mapping):
    """Read-only mapping key -> tensor over one or more checkpoint files; tensors are read on access."""

    def __init__(self, files: Iterable):
        self._where: dict[str, str] = {}  # key -> file
        self._handles: dict[str, object] = {}  # file -> safe_open handle or mmap'd state dict
        for f in map(str, files):
            keys = self._open(f)
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"{f}: key {k!r} also present in {self._where[k]}")
                self._where[k] = f

    def _open(self, f: str) -> Iterable[str]:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: file not found")
        if f.endswith(SAFETENSORS_EXTS):
            from safetensors import safe_open

            try:
                handle = safe_open(f, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for a truncated/corrupt header
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
            self._handles[f] = handle
            return list(handle.keys())
        if f.endswith(PICKLE_EXTS):
            sd = _load_pickle(f)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]  # original (Lightning-era) SD checkpoints nest the weights
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            self._handles[f] = sd
            return list(sd.keys())
        raise CheckpointError(f"{f}: unknown checkpoint extension (expected .safetensors, .bin, .pt, .ckpt)")

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]
        h = self._handles[f]
        if isinstance(h, dict):
            return h[key]
        try:
            return h.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def file_of(self, key: str) -> str:
        return self._where[key]


def component_folder(path: Path, sub: str, config="config.json") -> Path:
    """A pipeline root holds the component in a subfolder (unet/, vae/, scheduler/); a component folder is itself."""
    return path / sub if (path / sub / config).is_file() else path


def open_checkpoint(files) -> Checkpoint:
    if isinstance(files, (str, Path)):
        files = [files]
    return Checkpoint(files)


def _names(keys, limit=10) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _not_finite(file, name, value, converted=None) -> str:
    """The error for a tensor with NaN/inf: counts, and whether the file or the dtype cast put them there."""
    if converted is not None and value.isfinite().all():
        return (f"{file}: tensor {name!r} overflows {converted.dtype} (largest magnitude {value.abs().max().item():.3g}); "
                "load it in a wider dtype")
    nan, inf = value.isnan().sum().item(), value.isinf().sum().item()
    return f"{file}: tensor {name!r} holds {nan} NaN and {inf} inf values of {value.numel()}: the checkpoint is broken"


def check_finite(tensors: Mapping, source: str) -> None:
    """CheckpointError naming the first floating tensor with NaN or inf values (one reduction per tensor).
    For loaders that do not go through load_strict; `tensors` may be a Checkpoint (errors then name each key's file)."""
    where = tensors.file_of if hasattr(tensors, "file_of") else (lambda k: source)
    for name, value in tensors.items():
        if value.is_floating_point() and not value.isfinite().all():
            raise CheckpointError(_not_finite(where(name), name, value))


def assign_tensor(module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool):
    """Put `value` in place of the parameter or buffer `name` ("blocks.0.attn.weight") of module, replacing the
    tensor object (so a meta-device model gets real storage without a copy)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        owner._buffers[attr] = value


def load_strict(module: nn.Module, tensors: Mapping, source: str, dtype: torch.dtype | None = None) -> nn.Module:
    """
    Assign every parameter and persistent buffer of `module` (which may live on the meta device) from `tensors`
    (key -> Tensor, or key -> zero-argument callable returning a Tensor), one tensor at a time.
    Missing, unexpected or mis-shaped tensors raise CheckpointError naming the key and `source`.
    Floating tensors are converted to `dtype`, or to the dtype the module declares when `dtype` is None, and must be
    finite (NaN/inf weights would otherwise load silently and only show as empty output much later).
    """
    expected = module.state_dict(keep_vars=True)  # name -> Parameter/buffer (meta or real)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        msg = [f"{source}: checkpoint does not match {type(module).__name__}"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        raise CheckpointError("\n  ".join(msg))

    where = tensors.file_of if hasattr(tensors, "file_of") else (lambda k: source)
    for name, target in expected.items():
        value = tensors[name]
        value = value() if callable(value) else value
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{where(name)}: tensor {name!r} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}"
            )
        if value.is_floating_point():
            converted = value.to(dtype or target.dtype)
            if not converted.isfinite().all():  # after the cast, so an fp16 overflow is caught too
                raise CheckpointError(_not_finite(where(name), name, value, converted))
            value = converted
        assign_tensor(module, name, value, target.requires_grad)
    left = [n for n, t in module.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors left uninitialised after loading: {_names(left)}")
    return module


def write_atomically(path, write):
    """write(temporary path), then rename it to `path`: a reader (or a crash) never sees half a file. The file is
    readable by everyone (safetensors creates its files 0600; a model folder is for everyone to read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def recompute_in_backward(owner: nn.Module, fn, *args):
    """fn(*args), its activations recomputed in backward instead of kept (torch.utils.checkpoint) when `owner` has
    gradient_checkpointing on and trains with gradients; the one guard of the ViT, resampler, LLM and U-Net blocks."""
    if owner.gradient_checkpointing and owner.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
