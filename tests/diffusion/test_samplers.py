"""Our schedules, DDPM and DDIM samplers and classifier-free guidance against diffusers' schedulers (float64)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lit_methods.diffusion import DDIMSampler, DDPMSampler, guided_eps_fn, make_alphas_cumprod, make_betas

SHAPE = (4, 1, 8, 8)


def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic noise predictor depending on x and t (the card's)."""
    return torch.tanh(0.3 * x + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype))


def in_float64(scheduler):
    """diffusers keeps float32 tables: give it ours in float64 so both sides compute in float64."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = scheduler.alphas.double()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return scheduler


def x_start() -> torch.Tensor:
    return torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("ours", "theirs"), [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                              ("cosine", "squaredcos_cap_v2")])
def test_schedules_equal_diffusers_tables(ours, theirs):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    torch.testing.assert_close(make_betas(ours, 1000).float(), scheduler.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(make_alphas_cumprod(ours, 1000).float(), scheduler.alphas_cumprod, rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize(("steps", "num_timesteps"), [(10, 1000), (40, 40)])
def test_ddpm_equals_diffusers_ddpm_scheduler(steps, num_timesteps):
    """Skipping steps (10 of 1000) and every step (40 of a 40-step schedule: beta_tilde of consecutive steps)."""
    scheduler = in_float64(DDPMScheduler(num_train_timesteps=num_timesteps, clip_sample=False,
                                         variance_type="fixed_small"))
    scheduler.set_timesteps(steps)
    sampler = DDPMSampler(scheduler.alphas_cumprod, steps)
    assert sampler.timesteps == scheduler.timesteps.tolist()
    x, generator = x_start(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t.repeat(SHAPE[0])), t, x, generator=generator).prev_sample
    ours = sampler.sample(eps_fn, x_start(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(eta):
    scheduler = in_float64(DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True))
    scheduler.set_timesteps(20)
    sampler = DDIMSampler(scheduler.alphas_cumprod, 20, eta=eta)
    assert sampler.timesteps == scheduler.timesteps.tolist()
    x, generator = x_start(), torch.Generator().manual_seed(1)
    ours = x_start()
    for t, target in zip(sampler.timesteps, sampler.targets):
        noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64) if eta > 0 else None
        x = scheduler.step(eps_fn(x, torch.full((SHAPE[0],), t)), t, x, eta=eta, variance_noise=noise).prev_sample
        ours = sampler.update(ours, eps_fn(ours, torch.full((SHAPE[0],), t)), sampler.alpha_bar(t),
                              sampler.alpha_bar(target), noise)
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)  # at every step
    whole = sampler.sample(eps_fn, x_start(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(whole, x, rtol=0, atol=1e-10)


def test_ddim_eta0_is_deterministic_and_eta1_draws_noise():
    alphas = make_alphas_cumprod("linear", 1000)
    first = DDIMSampler(alphas, 10).sample(eps_fn, x_start(), torch.Generator().manual_seed(1))
    second = DDIMSampler(alphas, 10).sample(eps_fn, x_start(), torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    noisy = DDIMSampler(alphas, 10, eta=1.0).sample(eps_fn, x_start(), torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, first)


def test_guidance_weights_one_and_zero_give_the_conditional_and_unconditional_passes():
    def model_fn(x, t, c):
        return torch.sin(x + c.view(-1, 1, 1, 1).to(x.dtype)) * (1 + t.view(-1, 1, 1, 1) / 1000)

    x, t, labels = x_start(), torch.full((SHAPE[0],), 500), torch.tensor([0, 3, 5, 9])
    conditional, unconditional = model_fn(x, t, labels), model_fn(x, t, torch.full_like(labels, 10))
    assert torch.equal(guided_eps_fn(model_fn, labels, 10, 1.0)(x, t), conditional)
    assert torch.equal(guided_eps_fn(model_fn, labels, 10, 0.0)(x, t), unconditional)
    torch.testing.assert_close(guided_eps_fn(model_fn, labels, 10, 3.0)(x, t),
                               unconditional + 3 * (conditional - unconditional))


def test_bad_sampler_inputs_are_named():
    alphas = make_alphas_cumprod("linear", 1000)
    with pytest.raises(ValueError, match="steps=1001"):
        DDIMSampler(alphas, 1001)
    with pytest.raises(ValueError, match="'sigmoid'"):
        make_betas("sigmoid", 1000)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(alphas, 10, eta=-1)
