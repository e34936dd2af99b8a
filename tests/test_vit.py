"""CLIP ViT: parity with transformers on tiny random models saved in the official layouts, strict loading, and
preprocessing. transformers is a test-only reference."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers  # the reference (requirements-test.txt)
from safetensors import safe_open
from safetensors.torch import save_file

import vit
from weights import CheckpointError


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
              image_size=16, layer_norm_eps=1e-5)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def perturb(model):  # LayerNorms start at 1/0 and biases at 0: make every tensor matter
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def read_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random CLIP models in four layouts; all share the same vision weights. -> (folders, HF vision model)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip")
    full = perturb(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16))).eval()
    full.save_pretrained(root / "full")  # full CLIPModel, model.safetensors (keys vision_model.*, text_model.*, ...)
    sd = read_file(root / "full" / "model.safetensors")
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # int64 buffers as in the official file
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]

    # Official .bin layout: the same full state dict pickled with torch.save.
    (root / "bin").mkdir()
    shutil.copy(root / "full" / "config.json", root / "bin" / "config.json")
    torch.save(sd, root / "bin" / "pytorch_model.bin")

    # Vision-only as on the hub (model_type clip_vision_model, fields at the top level, keys vision_model.*).
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    hf.save_pretrained(root / "vision5")  # transformers 5.x writes these keys WITHOUT the vision_model. prefix
    (root / "vision").mkdir()
    shutil.copy(root / "vision5" / "config.json", root / "vision" / "config.json")
    vision_sd = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    save_file(vision_sd, root / "vision" / "model.safetensors")
    save_file({k.removeprefix("vision_model."): v for k, v in vision_sd.items() if "position_ids" not in k},
              root / "vision5" / "model.safetensors")
    return root, full.vision_model


LAYOUTS = ["full", "bin", "vision", "vision5"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_every_hidden_state(folders, layout):
    root, hf = folders
    model = vit.VisionTransformer.from_pretrained(root / layout)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        last, hidden = model(x, return_hidden_states=True)
        ref = hf(pixel_values=x, output_hidden_states=True)
    assert len(hidden) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(hidden, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pooled(last), ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert torch.equal(model(x), last)


def test_config_from_file(folders):
    root, _ = folders
    cfg = json.loads((root / "full" / "config.json").read_text())
    assert cfg["model_type"] == "clip" and "vision_config" in cfg
    model = vit.VisionTransformer.from_pretrained(root / "full")
    assert (model.cfg.hidden_size, model.cfg.num_hidden_layers, model.cfg.patch_size) == (32, 2, 4)


def test_interpolated_positions_match_transformers(folders):
    # transformers' interpolate_pos_encoding is the same scheme (bicubic to the new patch grid,
    # align_corners=False, class position kept), so the outputs agree exactly, square or not.
    root, hf = folders
    model = vit.VisionTransformer.from_pretrained(root / "vision")
    g = torch.Generator().manual_seed(3)
    for size in [(24, 20), (32, 32), (8, 12)]:
        x = torch.randn(1, 3, *size, generator=g)
        with torch.no_grad():
            ours = model(x)
            theirs = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert ours.shape == (1, 1 + (size[0] // 4) * (size[1] // 4), 32)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    emb = model.embeddings
    assert emb.positions(4, 4) is emb.position_embedding.weight  # native grid: untouched


def test_dtype(folders):
    root, _ = folders
    assert vit.VisionTransformer.from_pretrained(root / "full").pre_layrnorm.weight.dtype == torch.float32
    model = vit.VisionTransformer.from_pretrained(root / "bin", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randn(1, 3, 16, 16)).dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# Strict loading


def broken_copy(root, src, name, edit):
    """A copy of layout `src` whose vision safetensors file went through edit(state_dict)."""
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / src, dst)
    sd = read_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("case", ["missing", "unexpected", "unknown_top_level", "shape"])
def test_strict_errors_name_the_key(folders, case):
    root, _ = folders
    key = "vision_model.encoder.layers.1.mlp.fc2.bias"
    edits = {
        "missing": lambda sd: sd.pop(key),
        "unexpected": lambda sd: sd.update({"vision_model.encoder.layers.2.mlp.fc2.bias": torch.zeros(32)}),
        "unknown_top_level": lambda sd: sd.update({"adapter.weight": torch.zeros(3)}),
        "shape": lambda sd: sd.update({key: torch.zeros(33)}),
    }
    named = {"missing": key, "unexpected": "layers.2.mlp.fc2.bias", "unknown_top_level": "adapter.weight",
             "shape": key}
    folder = broken_copy(root, "vision", f"broken_{case}", edits[case])
    with pytest.raises(CheckpointError, match=named[case].replace(".", r"\.")) as err:
        vit.VisionTransformer.from_pretrained(folder)
    if case == "shape":
        assert "model.safetensors" in str(err.value) and "(33,)" in str(err.value)


def test_strict_missing_key_in_bin(folders):
    root, _ = folders
    dst = root / "broken_bin"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / "bin", dst)
    sd = torch.load(dst / "pytorch_model.bin", weights_only=True)
    del sd["vision_model.embeddings.class_embedding"]
    torch.save(sd, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"vision_model\.embeddings\.class_embedding"):
        vit.VisionTransformer.from_pretrained(dst)


@pytest.mark.parametrize("layout,file", [("vision", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_file(folders, layout, file):
    root, _ = folders
    dst = root / f"truncated_{layout}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / layout, dst)
    data = (dst / file).read_bytes()
    (dst / file).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        vit.VisionTransformer.from_pretrained(dst)


def test_bad_config(folders):
    root, _ = folders
    dst = root / "bad_config"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / "vision", dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["patch_size"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*patch_size"):
        vit.VisionTransformer.from_pretrained(dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        vit.VisionTransformer.from_pretrained(dst)


# -----------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("hw", [(30, 41), (41, 30), (24, 24), (17, 19)])
def test_clip_preprocess_matches_transformers(hw):
    from PIL import Image

    import transformers.utils.logging as hf_logging

    hf_logging.set_verbosity_error()  # without torchvision it announces its Pillow fallback
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8))
    ours = vit.clip_preprocess(img, 24)
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, proc(images=img, return_tensors="pt").pixel_values[0], atol=1e-5, rtol=1e-5)


def test_normalize():
    x = torch.full((2, 3, 4, 4), 0.5)
    y = vit.normalize(x)
    for c in range(3):
        assert torch.allclose(y[:, c], torch.tensor((0.5 - vit.CLIP_MEAN[c]) / vit.CLIP_STD[c]))


def test_fresh_model_is_initialised_and_sincos_not_poisoned_by_meta():
    # a ViT trained from scratch (the tiny world) must not start from uninitialised memory
    cfg = vit.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=4, image_size=16, layer_norm_eps=1e-5)
    emb = vit.VisionTransformer(cfg).embeddings.class_embedding
    assert torch.isfinite(emb).all() and 0.05 < emb.std() < 0.5
    with torch.device("meta"):
        vit.sincos_2d(3, 5, 8)
    assert vit.sincos_2d(3, 5, 8).device.type == "cpu"
