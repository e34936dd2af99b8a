"""Number for number with the authors' code: a tiny MM-Interleaved built and run by their own repository
(OpenGVLab/MM-Interleaved, fixtures/official-mmi/README.md says how), its released-checkpoint file, its inputs and
every intermediate. mmi loads that checkpoint with released.py and must reproduce each expected.* tensor.

MMI_OFFICIAL_FIXTURE=folder runs the same tests on another fixture built the same way: every size comes from the
fixture's files. Tolerance: max |ours - theirs| <= TOL * max |theirs| per tensor, fp32 (the fixture itself differs
by <= 1.1e-6 x max between 1 and 2 threads; a real bug gives 1e-2 .. 1).
"""
import json
import os
from pathlib import Path

import pytest
import torch

import released
import vit

FIXTURE = Path(os.environ.get("MMI_OFFICIAL_FIXTURE", Path(__file__).parent / "fixtures" / "official-mmi"))
TOL = 1e-5
COMPARED = {}  # key -> relative max error, reported at the end of the module

pytestmark = pytest.mark.skipif(not (FIXTURE / "fixture.json").is_file(), reason=f"no fixture at {FIXTURE}")


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if COMPARED:  # printed even when pytest captures output
        lines = [f"official parity ({FIXTURE}): max |ours - theirs| / max |theirs|, tolerance {TOL:g}"]
        lines += [f"  {k:<40} {err:.2e}" for k, err in COMPARED.items()]
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURE / "fixture.json").read_text())


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file
    return load_file(str(FIXTURE / "fixture.safetensors"))


@pytest.fixture(scope="module")
def ckpt():
    return released.released_checkpoint(FIXTURE / "mm_interleaved_pretrain")


def component(meta, path):
    return FIXTURE / path


def compare(fx, key, ours, tol=TOL):
    ref = fx[key]
    assert tuple(ours.shape) == tuple(ref.shape), f"{key}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()
    COMPARED[key] = err
    assert err <= tol, f"{key}: max |ours - theirs| = {err:.2e} x max |theirs| > {tol:g}"


@pytest.fixture(scope="module")
def adapter(meta, ckpt):
    """Our ViT-Adapter from the fixture's CLIP folder and the adapter weights of the released checkpoint."""
    clip = component(meta, meta["model_config"]["visual_tokenizer_config"]["encoder_model_path"])
    model = vit.ViTAdapter(vit.VisionTransformer.from_pretrained(clip, torch.float32))
    targets = {"adapter." + k: v for k, v in model.state_dict().items()}
    vision = {k: v for k, v in ckpt.items() if k.startswith(released.VM)}
    plan = released.convert(vision, targets, ckpt.file_of)
    left = targets.keys() - plan.keys()
    assert left == {"adapter.vit.post_layernorm.weight", "adapter.vit.post_layernorm.bias"}  # not in the release
    released.assign(model, {k.removeprefix("adapter."): v for k, v in plan.items()})
    return model.eval()


def test_adapter_maps(fx, adapter):
    with torch.no_grad():
        tokens, maps = adapter(fx["input.image_tensors"], positions=False)
    compare(fx, "expected.vit_last_hidden_state", tokens)
    for i, m in enumerate(maps):
        compare(fx, f"expected.adapter_map_{i}", m)


def test_position_tables_are_ours(ckpt, adapter):
    """The checkpoint stores the sin-cos tables the model computes (rows first; class row zero)."""
    table = ckpt["visual_tokenizer.pos_embed"].float()
    g = adapter.grid
    assert table.shape == (1 + g * g, adapter.vit.cfg.hidden_size)
    assert table[0].abs().max() == 0
    torch.testing.assert_close(table[1:], vit.sincos_2d(g, g, table.shape[1]), atol=1e-6, rtol=0)
