"""
Diffusion: the discrete noise schedule of Stable Diffusion (diffusers' scheduler_config.json fields), the training
target, DDPM-ancestral and DDIM sampling, and classifier-free guidance.

    sched = NoiseSchedule.from_pretrained("stable-diffusion-2-1-base")   # pipeline root, scheduler/ or the .json
    x_t = sched.add_noise(x0, noise, t); loss = mse(unet(x_t, t, c), sched.target(x0, noise, t))
    x0 = sched.sample(lambda x, t: cfg_combine(unet(x, t, c), unet(x, t, null), 7.5), noise, steps=50)
"""
import inspect
from pathlib import Path

import torch

from weights import CheckpointError, component_folder, read_json


class NoiseSchedule:
    """Discrete DDPM schedule (diffusers scheduler_config.json fields) with DDPM-ancestral and DDIM sampling.
    prediction_type: "epsilon", "v_prediction" or "sample" -- read from the config, never guessed."""

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=0, timestep_spacing="leading", set_alpha_to_one=True,
                 clip_sample=True, clip_sample_range=1.0):
        self.config = {k: v for k, v in locals().items() if k != "self"}  # what rebuilds it (MMIConfig.schedule)
        self.N, self.prediction_type, self.steps_offset = num_train_timesteps, prediction_type, steps_offset
        self.timestep_spacing, self.set_alpha_to_one = timestep_spacing, set_alpha_to_one
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        if beta_schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.N, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, self.N, dtype=torch.float32)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (N,) float32, as diffusers

    @classmethod
    def from_pretrained(cls, path):
        """scheduler_config.json, a scheduler/ folder, or a pipeline root. Keys missing from the file take
        diffusers' defaults (clip_sample True, set_alpha_to_one True, prediction_type epsilon)."""
        path = Path(path)
        if path.is_dir():
            path = component_folder(path, "scheduler", "scheduler_config.json") / "scheduler_config.json"
        d = read_json(path)
        for k, ok in dict(thresholding=False, variance_type="fixed_small", rescale_betas_zero_snr=False).items():
            if d.get(k, ok) != ok:
                raise CheckpointError(f"{path}: unsupported scheduler option {k}={d[k]!r}")
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in names})

    # --- training -----------------------------------------------------------------------------------------------
    def _at(self, t, x):  # alphas_cumprod[t] broadcast against x
        a = self.alphas_cumprod.to(x.device)[t.to(x.device)].to(x.dtype)
        return a.reshape(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0, noise, t):  # q(x_t | x_0)
        a = self._at(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, t):
        """What the network is trained to predict at timestep t."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a = self._at(t, x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        return x0

    # --- sampling -----------------------------------------------------------------------------------------------
    def timesteps(self, steps):
        """The descending inference timesteps (diffusers `set_timesteps`)."""
        if self.timestep_spacing == "leading":
            ts = (torch.arange(steps) * (self.N // steps)).flip(0) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = torch.arange(self.N, 0, -self.N / steps).round().long() - 1
        elif self.timestep_spacing == "linspace":
            ts = torch.linspace(0, self.N - 1, steps, dtype=torch.float64).round().long().flip(0)
        else:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}")
        return ts.long()

    def _split(self, x, out, a):
        """Model output -> (predicted x0, predicted epsilon) at alphas_cumprod a."""
        if self.prediction_type == "epsilon":
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        elif self.prediction_type == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def _alpha(self, t, final):
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(final)

    def ddim_step(self, out, t, t_prev, x, eta=0.0, generator=None, noise=None):
        """x_t -> x_{t_prev} (t_prev < 0 at the last step). eta=0: deterministic DDIM."""
        a = self._alpha(t, 1.0).to(x)
        a_prev = self._alpha(t_prev, 1.0 if self.set_alpha_to_one else self.alphas_cumprod[0].item()).to(x)
        x0, eps = self._split(x, out, a)  # eps stays the unclipped prediction, as diffusers does by default
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            noise = _randn(x, generator) if noise is None else noise
            prev = prev + sigma * noise
        return prev

    def ddpm_step(self, out, t, t_prev, x, generator=None, noise=None):
        """Ancestral sample of x_{t_prev} from the posterior q(x_{t_prev} | x_t, x0 predicted); fixed_small variance."""
        a, a_prev = self._alpha(t, 1.0).to(x), self._alpha(t_prev, 1.0).to(x)
        alpha, beta = a / a_prev, 1 - a / a_prev  # the effective one-step alpha/beta between t_prev and t
        x0, _ = self._split(x, out, a)
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a)) * x
        if t > 0:
            var = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
            noise = _randn(x, generator) if noise is None else noise
            mean = mean + var.sqrt() * noise
        return mean

    @torch.no_grad()
    def sample(self, denoise_fn, noise, steps=50, sampler="ddim", generator=None, eta=0.0):
        """Start from pure noise and run `steps` denoising steps. denoise_fn(x, t LongTensor[B]) -> model output
        (apply classifier-free guidance inside it, e.g. with `cfg_combine`)."""
        ts = self.timesteps(steps).tolist()
        x = noise
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            out = denoise_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            if sampler == "ddim":
                x = self.ddim_step(out, t, t_prev, x, eta=eta, generator=generator)
            elif sampler == "ddpm":
                x = self.ddpm_step(out, t, t_prev, x, generator=generator)
            else:
                raise ValueError(f"unknown sampler {sampler!r}")
        return x


def _randn(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def cfg_combine(cond, uncond, scale):
    """Classifier-free guidance: move `scale` times the conditional difference away from the unconditional output."""
    return uncond + scale * (cond - uncond)


def guided(denoise_both, scale):
    """A denoise_fn for NoiseSchedule.sample with classifier-free guidance: denoise_both(x, t) runs the batch doubled,
    its first half conditional and its second unconditional."""
    def fn(x, t):
        cond, uncond = denoise_both(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return cfg_combine(cond, uncond, scale)
    return fn
