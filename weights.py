"""
Lazy, strict checkpoint loading shared by every `from_pretrained` in mmi.

Checkpoints are read one tensor at a time (safetensors `safe_open`, or `torch.load(mmap=True, weights_only=True)` for
pickles) and assigned into a module built on the meta device, so loading a model never holds two copies of it.
Every failure is a CheckpointError that names the file and the key.
"""
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
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


def weight_files(folder, stem: str) -> list[Path]:
    """The weight files of `stem` in `folder`: single file or shards listed by an index, safetensors preferred."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    for ext in (".safetensors", ".bin"):
        single, index = folder / f"{stem}{ext}", folder / f"{stem}{ext}.index.json"
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
    raise CheckpointError(f"{folder}: no {stem}.safetensors, {stem}.bin or sharded index found")


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
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                try:  # mmap needs the zip format; old-style pickles load without it
                    sd = torch.load(f, map_location="cpu", weights_only=True)
                except Exception:
                    raise CheckpointError(f"{f}: cannot load ({e})") from None
            except Exception as e:  # UnpicklingError for anything beyond plain tensors and containers
                found = re.search(r"GLOBAL (\S+)", str(e))
                what = f"it pickles {found.group(1)}" if found else f"{type(e).__name__}"
                raise CheckpointError(
                    f"{f}: refused by torch.load(weights_only=True): {what}. "
                    "Only plain tensor pickles are loaded; use the .safetensors version of this checkpoint."
                ) from None
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

    def files(self) -> list[str]:
        return list(self._handles)


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


def load_strict(module: nn.Module, tensors: Mapping, source: str, dtype: torch.dtype | None = None) -> nn.Module:
    """
    Assign every parameter and persistent buffer of `module` (which may live on the meta device) from `tensors`
    (key -> Tensor, or key -> zero-argument callable returning a Tensor), one tensor at a time.
    Missing, unexpected or mis-shaped tensors raise CheckpointError naming the key and `source`.
    Floating tensors are converted to `dtype`, or to the dtype the module declares when `dtype` is None.
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
            value = value.to(dtype or target.dtype)
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=target.requires_grad)
        else:
            owner._buffers[attr] = value
    left = [n for n, t in module.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors left uninitialised after loading: {_names(left)}")
    return module
