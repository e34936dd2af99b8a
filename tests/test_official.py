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

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

import released
import vit

FIXTURE = Path(os.environ.get("MMI_OFFICIAL_FIXTURE", Path(__file__).parent / "fixtures" / "official-mmi"))
TOL = 1e-5
COMPARED = {}  # key -> relative max error, reported at the end of the module

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
    targets = {released.AD + k: v for k, v in model.state_dict().items()}  # named as in MMI
    vision = {k: v for k, v in ckpt.items() if k.startswith(released.VM)}
    plan = released.convert(vision, targets, ckpt.file_of)
    left = targets.keys() - plan.keys()
    assert left == {released.AD + "vit.post_layernorm.weight", released.AD + "vit.post_layernorm.bias"}  # not released
    released.assign(model, {k.removeprefix(released.AD): v for k, v in plan.items()})
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


# -----------------------------------------------------------------------------
# The whole model from the released checkpoint


@pytest.fixture(scope="module")
def model(build_official):
    return build_official()[0]


@pytest.fixture(scope="module")
def run(model, fx):
    """Every intermediate of one pass over the fixture's batch, taken where the official ones were."""
    tokens, images = fx["input.text_ids"], fx["input.image_tensors"]
    seen = {}

    def keep(name, first_arg=True):  # a forward pre-hook that records its module's input (the first call's)
        def hook(module, args):
            seen.setdefault(name, args[0] if first_arg else args)  # returns None: the input stays as it is
        return hook
    vt, dec = model.visual_tokenizer, model.image_decoder
    hooks = [vt.resampler.out.register_forward_pre_hook(keep("resampler_out")),
             dec.resampler.register_forward_pre_hook(keep("context", False)),
             *(b.register_forward_pre_hook(keep(f"layer{i}")) for i, b in enumerate(model.llm.layers))]
    with torch.no_grad():
        emb, maps = vt(images)
        h, lay, levels = model.hidden_states(tokens, images)
        N = len(lay.rows)
        cond = dec.condition(h, lay.rows, lay.start, lay.pos)  # every image, as the official code does
        dec_images = fx["input.image_tensors_dec"]
        mean, logvar = dec.vae.encode(dec_images * 2 - 1)
        x0 = dec.to_latent(dec_images, fx["input.vae_eps"])
        t, noise = fx["input.timesteps"], fx["input.noise"]
        x_t = dec.schedule.add_noise(x0, noise, t)
        ctx = dec.context(*levels, lay.prev)
        pred = dec.denoise(x_t, t, cond, ctx)
        batch = dict(tokens=tokens, images=images, images_dec=dec_images)
        # the authors' random draws, replayed; their code draws the null condition in eval mode too (ours: training
        # only), so the decoder alone trains here (it has no dropout: nothing else changes)
        drawn = lay.has_context  # the images with a loss: the draws of those
        draws = [x[drawn] for x in (fx["input.uncond_rand"].reshape(-1), fx["input.vae_eps"], noise, t)]
        with patch.object(dec, "random_draws", lambda n, device: draws):
            dec.train()
            out = model(batch)
            dec.eval()
        r = dict(
            vit_last_hidden_state=vt.adapter(images, positions=False)[0], visual_tokens=emb,
            resampler_out=seen["resampler_out"], mm_embeds=model.embed(tokens, emb),
            cross_attention_mask=lay.visible.float(),
            llm_hidden_states=torch.stack([*(seen[f"layer{i}"] for i in range(len(model.llm.layers))), h]),
            text_logits=model.logits(h), gt_text_ids=model.text_targets(tokens),
            gt_text_ids_laion=model.text_targets(tokens, pairs=True),
            context_features=seen["context"][0], context_attention_mask=seen["context"][1].long(),
            dec_mmfs_mask=(lay.prev >= 0).long()[:, None], decoder_condition=cond,
            neg_prompt_embeds=dec.null_cond[None],
            vae_posterior_mean=mean, vae_posterior_logvar=logvar, latents=x0, noisy_latents=x_t,
            diffusion_target=dec.schedule.target(x0, noise, t), unet_pred=pred,
            unet_pred_null_condition=dec.denoise(x_t, t, dec.null_cond.expand(N, -1, -1), ctx),
            unet_pred_no_mmfs_module=dec.unet(x_t, t, cond), image_has_loss=lay.has_context.long(),
            loss=out["loss"], forward_loss_txt=out["text_loss"], forward_loss_img=out["image_loss"])
        r["sd_loss_map"] = (pred - r["diffusion_target"]).square()
        for key, targets in [("loss_txt", r["gt_text_ids"]), ("loss_txt_laion", r["gt_text_ids_laion"])]:
            r[key] = F.cross_entropy(r["text_logits"][:, :-1].flatten(0, 1), targets.flatten())
        r["loss_img"] = (r["sd_loss_map"] * r["image_has_loss"][:, None, None, None]).mean()
    for hook in hooks:
        hook.remove()
    return r


# Tensors compared on the real tokens / context positions only: mmi's LLM does not mask padded keys (rows are
# right-padded, so real tokens never see them; padded positions carry no loss), and a context shorter than the
# longest is padded with other values before the resampler masks it.
MASKED = {"llm_hidden_states": "tokens", "text_logits": "tokens", "context_features": "context"}
EXACT = ("cross_attention_mask", "gt_text_ids", "gt_text_ids_laion", "context_attention_mask", "dec_mmfs_mask",
         "image_has_loss")


def expected_keys(fx):
    return sorted(k.removeprefix("expected.") for k in fx if k.startswith("expected."))


def test_every_expected_tensor(fx, run):
    keys = [k for k in expected_keys(fx) if not k.startswith("adapter_map_")]  # those: test_adapter_maps
    missing = [k for k in keys if k not in run]
    assert not missing, f"not computed: {missing}"
    real = {"tokens": fx["input.attention_mask"].bool(), "context": fx["expected.context_attention_mask"].bool()}
    for k in keys:
        ours, ref = run[k], fx["expected." + k]
        if k in EXACT:  # masks and target ids: integer logic
            assert ours.shape == ref.shape and torch.equal(ours.to(ref.dtype), ref), k
            COMPARED["expected." + k] = 0.0
            continue
        ours = ours.reshape(ref.shape) if ours.numel() == ref.numel() else ours  # scalars: [] vs [1]
        if k in MASKED:
            keep = real[MASKED[k]][..., None]  # (B, T, 1) or (N, L, 1)
            ours, ref = ours * keep, ref * keep
        compare({"expected." + k: ref}, "expected." + k, ours)


def test_losses_match_the_scalars(meta, run):
    for k, v in meta["scalars"].items():
        assert abs(run[k].item() - v) <= TOL * abs(v), (k, run[k].item(), v)


def test_save_of_the_released_model_loads_back(model, fx, tmp_path):
    from checkpoints import load, save
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m").eval()
    loaded.tok = model.tok
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


@pytest.mark.parametrize("case", ["unknown", "missing", "shape", "constant", "component"])
def test_converter_is_strict(meta, ckpt, tmp_path, case):
    from checkpoints import build_model
    from weights import CheckpointError
    sd = {k: ckpt[k] for k in ckpt}
    key = "mm_decoder.layers.0.llama_cross_attn.attn.value_proj.weight"
    if case == "unknown":
        sd["visual_tokenizer.extra.weight"] = torch.zeros(2)
        key = "visual_tokenizer.extra.weight"
    elif case == "missing":
        del sd[key]
        key = "llm.layers.0.inserted.mmfs.value_proj.weight"  # named as ours: what the model lacks
    elif case == "shape":
        sd[key] = sd[key][:, :-1]
    elif case == "constant":
        key = "visual_tokenizer.pos_embed"
        sd[key] = sd[key].flip(0)
    else:  # a frozen tensor unlike the component folder's (the checkpoint of another LLaMA)
        sd["mm_decoder.layers.1.mlp.up_proj.weight"] = sd["mm_decoder.layers.1.mlp.up_proj.weight"] + 1
        key = "llm.layers.1.mlp.up_proj.weight"
    (tmp_path / "ckpt").mkdir()
    torch.save(sd, tmp_path / "ckpt" / "pytorch_model.bin")
    mc = meta["model_config"]
    clip, llm, sd = [FIXTURE / mc["visual_tokenizer_config"]["encoder_model_path"], FIXTURE / mc["llm_model_path"],
                     FIXTURE / mc["image_decoder_config"]["pretrained_model_name_or_path"]]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        build_model(released=tmp_path / "ckpt", clip=clip, llm=llm, sd=sd, released_config=mc)
