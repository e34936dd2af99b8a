"""weights.py: lazy strict loading. Every failure must name the file and the key."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weights import CheckpointError, load_strict, open_checkpoint, read_json, weight_files


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def meta_tiny():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_roundtrip_safetensors_and_bin(tmp_path):
    ref = tiny()
    sd = ref.state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    x = torch.randn(2, 3)
    for stem in ("model", "pytorch_model"):
        m = load_strict(meta_tiny(), open_checkpoint(weight_files(tmp_path, stem)), stem)
        assert torch.equal(m(x), ref(x))


def test_sharded_index_and_dtype(tmp_path):
    sd = tiny().state_dict()
    keys = list(sd)
    save_file({k: sd[k].half() for k in keys[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k].half() for k in keys[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(weight_files(tmp_path, "model"))
    assert ckpt.file_of(keys[3]).endswith("model-00002-of-00002.safetensors")
    m = load_strict(meta_tiny(), ckpt, "x", dtype=torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16
    assert torch.equal(m[0].weight, sd[keys[0]].half().to(torch.bfloat16))


def test_errors_name_key_and_file(tmp_path):
    sd = tiny().state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys.*1\.bias"):
        load_strict(meta_tiny(), {k: v for k, v in sd.items() if k != "1.bias"}, "src")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra"):
        load_strict(meta_tiny(), {**sd, "extra": torch.zeros(1)}, "src")
    save_file({**sd, "0.weight": torch.zeros(5, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'0\.weight'.*\(5, 3\)"):
        load_strict(meta_tiny(), open_checkpoint(tmp_path / "bad.safetensors"), "bad")
    good = tmp_path / "good.safetensors"
    save_file(sd, good)
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_strict(meta_tiny(), open_checkpoint(tmp_path / "trunc.safetensors"), "t")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.bin"):
        open_checkpoint(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        weight_files(tmp_path / "..", "model")
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="c.json"):
        read_json(tmp_path / "c.json")


def test_pickle_with_objects_refused(tmp_path):
    import argparse  # Lightning-era .ckpt files pickle objects like this: weights_only=True refuses them

    torch.save({"w": torch.zeros(1), "hparams": argparse.Namespace(lr=1)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt.*safetensors"):
        open_checkpoint(tmp_path / "evil.ckpt")


def test_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-1.safetensors.*missing"):
        weight_files(tmp_path, "model")
