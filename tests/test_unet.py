"""unet.py: parity with diffusers (U-Net, autoencoder, schedulers) on tiny random models, both checkpoint layouts."""
import json

import pytest
import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL as DAutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402

import diffusion  # noqa: E402
import unet  # noqa: E402
from weights import CheckpointError, load_strict  # noqa: E402

LPB = 2
SD2_TINY = dict(  # SD 2.x layout at toy size: linear projections, a different head count per level, cross-attn dim
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=LPB, block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 4), cross_attention_dim=24, use_linear_projection=True, norm_num_groups=8)
VAE_TINY = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=2, latent_channels=4,
                norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
DDPM_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1, clip_sample=False)
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def randomize(model, seed):  # diffusers zero-initialises some outputs; random values make parity meaningful
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# --- inverse of the single-file key map of unet.py (diffusers name -> original LDM name), written here ---------
RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
       "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def res(rest):
    head, _, tail = rest.partition(".")
    return f"{RES[head]}.{tail}"


def to_original_unet(k, cross_up):
    p = k.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding": {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}}
    if p[0] in ("conv_in", "conv_norm_out", "conv_out"):
        return f"{fixed[p[0]]}.{p[1]}"
    if p[0] == "time_embedding":
        return f"{fixed['time_embedding'][p[1]]}.{p[2]}"
    if p[0] == "mid_block":
        idx = 1 if p[1] == "attentions" else 2 * int(p[2])
        rest = ".".join(p[3:])
        return f"middle_block.{idx}." + (rest if p[1] == "attentions" else res(rest))
    i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(LPB + 1) * (i + 1)}.0.op.{p[-1]}"
        n = (LPB + 1) * i + j + 1
        return f"input_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if kind == "upsamplers":
        return f"output_blocks.{(LPB + 1) * i + LPB}.{2 if cross_up[i] else 1}.{rest}"
    n = (LPB + 1) * i + j
    return f"output_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"


def to_original_vae(k, v, n_levels):
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        if f"mid_block.attentions.0.{new}." in k:
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
            v = v[:, :, None, None] if v.ndim == 2 else v  # the original stores these as 1x1 convs
    p = k.split(".")
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else n_levels - 1 - int(p[2])
        name = "down" if p[1] == "down_blocks" else "up"
        if p[3] == "resnets":
            k = f"{p[0]}.{name}.{i}.block.{'.'.join(p[4:])}"
        else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
            k = f"{p[0]}.{name}.{i}.{name}sample.{'.'.join(p[5:])}"
    return k, v


@pytest.fixture(scope="module", params=[False, True], ids=["noupcast", "upcast"])
def unets(request, tmp_path_factory):
    """A random diffusers U-Net saved as a diffusers folder and as an original single-file checkpoint."""
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**SD2_TINY, upcast_attention=request.param), 1)
    root = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(root / "pipe" / "unet")
    vae = randomize(DAutoencoderKL(**VAE_TINY), 2)
    vae.save_pretrained(root / "pipe" / "vae")
    cross_up = [t.startswith("CrossAttn") for t in SD2_TINY["up_block_types"]]
    single = {"model.diffusion_model." + to_original_unet(k, cross_up): v.contiguous() for k, v in ref.state_dict().items()}
    for k, v in vae.state_dict().items():
        k, v = to_original_vae(k, v, len(VAE_TINY["block_out_channels"]))
        single["first_stage_model." + k] = v.contiguous()
    single["cond_stage_model.model.token_embedding.weight"] = torch.zeros(3, 2)  # other parts of the file: ignored
    single["betas"] = torch.zeros(1000)
    save_file(single, root / "sd-tiny.safetensors")
    return ref, vae, root


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 16, 16, generator=g), torch.tensor([10, 700][:b]), torch.randn(b, 7, 24, generator=g))


@pytest.mark.parametrize("layout", ["pipeline", "component", "file", "single"])
def test_unet_parity(unets, layout):
    ref, _, root = unets
    path = {"pipeline": root / "pipe", "component": root / "pipe" / "unet", "single": root / "sd-tiny.safetensors",
            "file": root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"}[layout]  # file: config beside it
    cfg = unet.UNetConfig.from_dict(dict(ref.config)) if layout == "single" else None  # groups=8 is not in the weights
    ours = unet.UNet.from_pretrained(path, config=cfg)
    x, t, c = inputs()
    with torch.no_grad():
        want = ref(x, t, c).sample
        got = ours(x, t, c)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("layout", ["pipeline", "component", "file", "single", "old_attention_names"])
def test_vae_parity(unets, layout, tmp_path):
    _, ref, root = unets
    path = {"pipeline": root / "pipe", "component": root / "pipe" / "vae", "single": root / "sd-tiny.safetensors",
            "file": root / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"}.get(layout)
    if layout == "old_attention_names":
        sd = {}
        for k, v in ref.state_dict().items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            sd[k] = v.contiguous()
        save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
        path = tmp_path
    cfg = unet.VAEConfig.from_dict(dict(ref.config)) if layout == "single" else None
    ours = unet.AutoencoderKL.from_pretrained(path, config=cfg)
    assert ours.scaling_factor == ref.config.scaling_factor
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        want, got = ref.decode(z).sample, ours.decode(z)
    for a, b in ((mean, dist.mean), (logvar, dist.logvar), (got, want)):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


def test_conv_projection_sd1_style():
    """SD 1.x layout: 1x1-conv proj_in/proj_out and one head count for every level."""
    cfg = dict(SD2_TINY, use_linear_projection=False, attention_head_dim=2)
    ref = randomize(UNet2DConditionModel(**cfg), 5)
    with torch.device("meta"):
        ours = unet.UNet(unet.UNetConfig.from_dict(dict(ref.config)))
    load_strict(ours, ref.state_dict(), "ref")
    x, t, c = inputs()
    with torch.no_grad():
        want = ref(x, t, c).sample
        assert (ours(x, t, c) - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


def test_ckpt_pickles(unets, tmp_path):
    """An original .ckpt (weights nested under state_dict) loads; one pickling more than tensors is refused."""
    ref, _, root = unets
    from safetensors.torch import load_file
    torch.save({"state_dict": load_file(root / "sd-tiny.safetensors"), "global_step": 3}, tmp_path / "sd.ckpt")
    ours = unet.UNet.from_pretrained(tmp_path / "sd.ckpt", config=unet.UNetConfig.from_dict(dict(ref.config)))
    x, t, c = inputs()
    with torch.no_grad():
        assert (ours(x, t, c) - ref(x, t, c).sample).abs().max() < 1e-4
    torch.save({"state_dict": {}, "callbacks": Opaque()}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match=r"(?s)lightning\.ckpt.*safetensors"):
        unet.UNet.from_pretrained(tmp_path / "lightning.ckpt")


class Opaque:  # stands in for the pytorch_lightning objects pickled in the original .ckpt
    pass


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    model = unet.UNet(unet.UNetConfig.from_dict(SD2_TINY)).train()
    x, t, c = inputs()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(x, t, c).square().mean().backward()
        grads.append(model.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_single_file_architecture_inference(unets):
    """Without a config the architecture comes from tensor shapes, heads = channels / 64 as in SD 2."""
    _, _, root = unets
    from weights import open_checkpoint
    ckpt = open_checkpoint(root / "sd-tiny.safetensors")
    lpb = unet._original_layers_per_block(ckpt, "model.diffusion_model.")
    inferred = unet._infer_unet_config(unet._renamed(ckpt, "model.diffusion_model.", lambda k: unet._unet_key(k, lpb), "f"))
    assert lpb == LPB and inferred.block_out_channels == SD2_TINY["block_out_channels"]
    assert inferred.down_block_types == SD2_TINY["down_block_types"] and inferred.up_block_types == SD2_TINY["up_block_types"]
    assert inferred.cross_attention_dim == 24 and inferred.use_linear_projection and inferred.attention_head_dim == (1, 1, 1)
    vae = unet._infer_vae_config(unet._renamed(ckpt, "first_stage_model.", lambda k: unet._vae_key(k, 2), "f"))
    assert vae.block_out_channels == (16, 32) and vae.layers_per_block == 2 and vae.latent_channels == 4


def test_taps_and_down_up(unets):
    ref, _, root = unets
    ours = unet.UNet.from_pretrained(root / "pipe")
    x, t, c = inputs()
    with torch.no_grad():
        base = ours(x, t, c)
        skips, mid, emb = ours.down(x, t, c)
        assert len(skips) == 1 + LPB * 3 + 2
        assert torch.equal(ours.up(skips, mid, emb, c), base)

        def tapped(res, mid_res):  # residuals on the skips and the mid block, as mmi's ImageDecoder adds them
            return ours.up([s + r for s, r in zip(skips, res)], mid + mid_res, emb, c)
        zeros = [torch.zeros_like(s) for s in skips]
        assert torch.equal(tapped(zeros, torch.zeros_like(mid)), base)
        res = [torch.randn_like(s) for s in skips]
        assert (tapped(res, torch.randn_like(mid)) - base).abs().max() > 1e-3
        want = ref(x, t, c, down_block_additional_residuals=tuple(res[:-1]) + (res[-1],),
                   mid_block_additional_residual=torch.zeros_like(mid)).sample
        assert (tapped(res, torch.zeros_like(mid)) - want).abs().max() < 1e-4


def test_strict_errors_name_key_and_file(unets, tmp_path):
    ref, vae, root = unets
    ucfg, vcfg = unet.UNetConfig.from_dict(dict(ref.config)), unet.VAEConfig.from_dict(dict(vae.config))
    from safetensors.torch import load_file
    sd = load_file(root / "sd-tiny.safetensors")
    bad = dict(sd)
    del bad["model.diffusion_model.out.2.bias"]
    save_file(bad, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing\.safetensors.*conv_out\.bias"):
        unet.UNet.from_pretrained(tmp_path / "missing.safetensors", config=ucfg)
    bad = dict(sd, **{"model.diffusion_model.out.2.bias": torch.zeros(5)})
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)shape\.safetensors.*conv_out\.bias.*\(5,\)"):
        unet.UNet.from_pretrained(tmp_path / "shape.safetensors", config=ucfg)
    bad = dict(sd, **{"first_stage_model.encoder.extra.weight": torch.zeros(1)})
    save_file(bad, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)extra\.safetensors.*unexpected.*encoder\.extra\.weight"):
        unet.AutoencoderKL.from_pretrained(tmp_path / "extra.safetensors", config=vcfg)
    with pytest.raises(CheckpointError, match=r"nowhere"):
        unet.UNet.from_pretrained(tmp_path / "nowhere")


# --- schedules and samplers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_schedule_from_config_and_training_targets(pred, tmp_path):
    DDIMScheduler(**SCHED, prediction_type=pred).save_config(tmp_path / "scheduler")
    ours = diffusion.NoiseSchedule.from_pretrained(tmp_path)  # pipeline root -> scheduler/scheduler_config.json
    assert ours.prediction_type == pred and ours.steps_offset == 1 and not ours.set_alpha_to_one
    ref = DDPMScheduler(**DDPM_SCHED, prediction_type=pred)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    want = noise if pred == "epsilon" else ref.get_velocity(x0, noise, t)
    assert torch.allclose(ours.target(x0, noise, t), want, atol=1e-6)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_one_step_parity(pred, spacing):
    ours = diffusion.NoiseSchedule(**SCHED, prediction_type=pred, timestep_spacing=spacing)
    ddim = DDIMScheduler(**SCHED, prediction_type=pred, timestep_spacing=spacing)
    ddpm = DDPMScheduler(**DDPM_SCHED, prediction_type=pred, timestep_spacing=spacing)
    ddim.set_timesteps(20)
    ddpm.set_timesteps(20)
    ts = ours.timesteps(20)
    assert torch.equal(ts, ddim.timesteps) and torch.equal(ts, ddpm.timesteps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 7, 19):  # first, middle and last step (the last one lands on final_alpha_cumprod / no noise)
        t, t_prev = ts[i].item(), ts[i + 1].item() if i < 19 else -1
        want = ddim.step(out, ts[i], x).prev_sample
        assert torch.allclose(ours.ddim_step(out, t, t_prev, x), want, atol=1e-5)
        want = ddpm.step(out, ts[i], x, generator=torch.Generator().manual_seed(5)).prev_sample
        got = ours.ddpm_step(out, t, t_prev, x, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(got, want, atol=1e-5)


def test_ddim_loop_matches_diffusers(unets):
    ref, _, root = unets
    ours = unet.UNet.from_pretrained(root / "pipe")
    sched = diffusion.NoiseSchedule(**SCHED, prediction_type="v_prediction")
    dsched = DDIMScheduler(**SCHED, prediction_type="v_prediction")
    x, _, c = inputs(1)
    uncond = torch.zeros_like(c)
    with torch.no_grad():
        def denoise(x, t):  # classifier-free guidance as the caller does it
            out = ours(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, uncond]))
            return diffusion.cfg_combine(*out.chunk(2), 3.0)
        got = sched.sample(denoise, x.clone(), steps=20)
        dsched.set_timesteps(20)
        want = x.clone()
        for t in dsched.timesteps:
            out = ref(torch.cat([want, want]), t, torch.cat([c, uncond])).sample
            cond, unc = out.chunk(2)
            want = dsched.step(unc + 3.0 * (cond - unc), t, want).prev_sample
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


def test_ddpm_sampling_is_seeded():
    sched = diffusion.NoiseSchedule(**SCHED)
    fn = lambda x, t: 0.1 * x  # noqa: E731
    a = sched.sample(fn, torch.ones(1, 2, 4, 4), 5, "ddpm", generator=torch.Generator().manual_seed(1))
    b = sched.sample(fn, torch.ones(1, 2, 4, 4), 5, "ddpm", generator=torch.Generator().manual_seed(1))
    c = sched.sample(fn, torch.ones(1, 2, 4, 4), 5, "ddpm", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
