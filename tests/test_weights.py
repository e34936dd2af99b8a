"""weights.py: lazy strict loading. Every failure must name the file and the key."""
import argparse
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weights import CheckpointError, check_finite, load_strict, open_checkpoint, read_json, weight_files


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
    with pytest.raises(CheckpointError, match="expected model.safetensors or pytorch_model.bin"):
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


class Boom:  # a pickle that would run a command when unpickled without weights_only
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_legacy_and_raw_pickles(tmp_path):
    # torch.save's legacy (non-zip) format cannot be memory-mapped: it is read whole when it holds plain tensors, and
    # refused as "not a plain tensor pickle" (never blamed on mmap) when it holds objects, like the zip format.
    sd = tiny().state_dict()
    torch.save(sd, tmp_path / "legacy_ok.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(tmp_path / "legacy_ok.bin")["0.weight"], sd["0.weight"])
    torch.save({**sd, "hparams": argparse.Namespace(lr=1)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for protocol in (2, 4):  # torch's legacy loader and its weights-only unpickler fail differently on the two
        with open(tmp_path / f"raw{protocol}.pt", "wb") as f:
            pickle.dump({"w": Boom()}, f, protocol=protocol)
    for name, why in [("legacy.ckpt", "it pickles argparse.Namespace"), ("raw2.pt", r"it pickles \S*system"),
                      ("raw4.pt", "Unsupported operand")]:
        with pytest.raises(CheckpointError, match=rf"{name}.*not a plain tensor pickle \({why}.*safetensors") as err:
            open_checkpoint(tmp_path / name)
        assert "mmap" not in str(err.value)
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"w": 1.0}, f, protocol=2)
    with pytest.raises(CheckpointError, match="plain.pt: cannot load, corrupt or not a torch.save file"):
        open_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "legacy_ok.bin").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.bin: cannot load, corrupt.*EOFError"):
        open_checkpoint(tmp_path / "cut.bin")


def test_missing_weights_name_the_real_file_names(tmp_path):
    # transformers writes model.safetensors and pytorch_model.bin; nobody writes pytorch_model.safetensors
    for stem in ("model", "pytorch_model"):
        with pytest.raises(CheckpointError) as err:
            weight_files(tmp_path, stem)
        msg = str(err.value)
        assert "model.safetensors or pytorch_model.bin" in msg and "pytorch_model.safetensors" not in msg, msg
        assert "model.safetensors.index.json" in msg and "pytorch_model.bin.index.json" in msg
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin"):
        weight_files(tmp_path, "diffusion_pytorch_model")
    save_file(tiny().state_dict(), tmp_path / "model.safetensors")
    assert weight_files(tmp_path, "pytorch_model") == [tmp_path / "model.safetensors"]  # either stem finds either file


def test_clip_folder_without_weights(tmp_path):
    import vit

    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
               image_size=8, layer_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": cfg}))
    with pytest.raises(CheckpointError) as err:
        vit.VisionTransformer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg and "pytorch_model.safetensors" not in msg, msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_refused(tmp_path, bad):
    sd = tiny().state_dict()
    sd["1.bias"] = sd["1.bias"].clone()
    sd["1.bias"][2] = bad
    save_file(sd, tmp_path / "broken.safetensors")
    torch.save(sd, tmp_path / "broken.bin")
    for f in ("broken.safetensors", "broken.bin"):
        with pytest.raises(CheckpointError, match=rf"broken\.{f.split('.')[1]}: tensor '1\.bias' holds .*broken"):
            load_strict(meta_tiny(), open_checkpoint(tmp_path / f), "src")
    with pytest.raises(CheckpointError, match=r"src: tensor '1\.bias'"):  # a plain dict: named by `source`
        load_strict(meta_tiny(), sd, "src")
    for tensors in (sd, open_checkpoint(tmp_path / "broken.safetensors")):  # for loaders not using load_strict
        with pytest.raises(CheckpointError, match=r"tensor '1\.bias' holds"):
            check_finite(tensors, str(tmp_path / "broken.safetensors"))
    check_finite(tiny().state_dict(), "fine")


def test_fp16_overflow_refused(tmp_path):
    sd = tiny().state_dict()
    sd["0.weight"] = sd["0.weight"] * 1e6  # finite in fp32, inf in fp16
    save_file(sd, tmp_path / "big.safetensors")
    load_strict(meta_tiny(), open_checkpoint(tmp_path / "big.safetensors"), "big")  # fine in fp32
    with pytest.raises(CheckpointError, match=r"big\.safetensors: tensor '0\.weight' overflows torch.float16"):
        load_strict(meta_tiny(), open_checkpoint(tmp_path / "big.safetensors"), "big", dtype=torch.float16)


def test_truncated_or_corrupt_safetensors(tmp_path):
    # What MMI.load meets when a training run was killed mid-save or a copy was cut: a CheckpointError, no traceback
    # from safetensors, whether the header or the data is damaged.
    save_file(tiny().state_dict(), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    for name, damaged in [("data_cut", data[:-4]), ("half", data[: len(data) // 2]), ("header_cut", data[: 8 + header // 2]),
                          ("empty", b""), ("garbage", data[:8] + b"x" * (len(data) - 8)),
                          ("huge_header", (1 << 50).to_bytes(8, "little") + data[8:])]:
        f = tmp_path / name / "model.safetensors"
        f.parent.mkdir()
        f.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=rf"{name}.model\.safetensors: corrupt or truncated"):
            check_finite(open_checkpoint(f), str(f))
