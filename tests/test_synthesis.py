"""The synthesis engine: per-image noise makes images independent of batching."""

from __future__ import annotations

import pytest
import torch

from common.generator import SCHEDULERS, load_generator
from common.synthesis import image_seed, sample


@pytest.fixture(scope="module")
def gens(tiny_stack_dir):
    return {s: load_generator(str(tiny_stack_dir / "generator"), s) for s in SCHEDULERS}


def _cond(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 16, generator=g)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_seed_same_images_for_every_batch_size(gens, scheduler):
    gen = gens[scheduler]
    cond, uncond = _cond(64), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=3, seed=7)
    ref = sample(gen, cond, uncond, batch_size=64, **kw)
    for bs in (1, 7):
        x = sample(gen, cond, uncond, batch_size=bs, **kw)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    # split into two calls at any point, with first_index: the same images
    a = sample(gen, cond[:23], uncond, batch_size=5, **kw)
    b = sample(gen, cond[23:], uncond, batch_size=64, first_index=23, **kw)
    torch.testing.assert_close(torch.cat([a, b]), ref, atol=1e-5, rtol=0)


def test_ddpm_is_stochastic_per_step_yet_reproducible(gens):
    # DDPM adds fresh noise at every step: it must come from the image's generator
    gen = gens["ddpm"]
    cond, uncond = _cond(4), torch.zeros(1, 1, 16)
    a = sample(gen, cond, uncond, num_inference_steps=4, seed=1)
    b = sample(gen, cond, uncond, num_inference_steps=4, seed=1)
    c = sample(gen, cond, uncond, num_inference_steps=4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latents_output_is_what_the_unet_denoises(gens):
    x = sample(gens["ddim"], _cond(2), torch.zeros(1, 1, 16), num_inference_steps=2,
               output="latents")  # fmt: skip
    assert x.shape == (2, *gens["ddim"].sample_shape)


def test_image_seeds_differ_per_index_and_seed():
    seeds = {image_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)


def test_bad_inputs_name_the_argument(gens):
    gen = gens["ddim"]
    with pytest.raises(ValueError, match="synth-batch-size"):
        sample(gen, _cond(2), torch.zeros(1, 1, 16), batch_size=0)
    with pytest.raises(ValueError, match="NaN"):
        sample(gen, torch.full((1, 1, 16), float("nan")), torch.zeros(1, 1, 16))
