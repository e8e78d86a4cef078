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
    # 24 images: one batch larger than them, batches of 1, batches of 7 that end
    # in a short one (7+7+7+3)
    cond, uncond = _cond(24), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=3, seed=7)
    ref = sample(gen, cond, uncond, batch_size=64, **kw)
    for bs in (1, 7):
        x = sample(gen, cond, uncond, batch_size=bs, **kw)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    # split into two calls at a point no batch ends on, with first_index: the
    # same images
    a = sample(gen, cond[:11], uncond, batch_size=5, **kw)
    b = sample(gen, cond[11:], uncond, batch_size=64, first_index=11, **kw)
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
    x = sample(
        gens["ddim"],
        _cond(2),
        torch.zeros(1, 1, 16),
        num_inference_steps=2,
        output="latents",
    )
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


# ---------------------------------------------------------------- memory


def test_planner_fits_an_injected_budget():
    from common.synthesis import MemoryModel, plan_batch

    gb = 2**30
    # the published SD-1.5 figures at 512 px, fp16: 2.6 GB fixed, 0.25 GB per
    # image for the UNet with CFG, 0.8 GB per decoded image; an 80 GB GPU
    model = MemoryModel(int(2.6 * gb), int(0.25 * gb), int(0.8 * gb))
    plan = plan_batch(80 * gb, model, margin=0.15)
    assert plan.batch_size * model.per_image + model.fixed <= 80 * gb * 0.85
    assert plan.decode_chunk * model.decode_per_image + model.fixed <= 80 * gb * 0.85
    assert (plan.batch_size, plan.decode_chunk) == (256, 81)  # capped; decode in chunks
    # the old default (256 decoded at once) needs 207 GB
    assert 256 * model.decode_per_image / gb > 200
    assert plan_batch(1 * gb, model).batch_size == 1  # never zero


class _OomAbove(torch.nn.Module):
    """Wraps the UNet; raises CUDA-style out-of-memory above a batch size."""

    def __init__(self, unet, limit):
        super().__init__()
        self.unet, self.limit, self.calls = unet, limit, []

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def test_out_of_memory_halves_and_retries_every_image_exactly_once(gens):
    import dataclasses

    from common.synthesis import MemoryModel

    gen = gens["ddim"]
    cond, uncond = _cond(20), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=2, seed=3)
    ref = sample(gen, cond, uncond, batch_size=20, **kw)
    flaky = dataclasses.replace(gen, unet=_OomAbove(gen.unet, limit=2 * 6))
    done: list[int] = []
    # an injected 16 MiB budget at 1 MiB per image, 15% kept free: batch 13;
    # the UNet fails above 6 images (x2 with CFG)
    x = sample(
        flaky,
        cond,
        uncond,
        batch_size="auto",
        free_bytes=16 * 2**20,
        memory=MemoryModel(0, 2**20, 2**20),
        progress=done.append,
        **kw,
    )
    assert flaky.unet.calls[0] == 26  # tried 13 images first
    assert sum(done) == 20 and max(done) <= 6
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)


def test_guidance_cutoff_drops_the_unconditional_pass(gens):
    gen = gens["ddim"]
    batches: list[int] = []
    hook = gen.unet.register_forward_hook(lambda m, a, o: batches.append(len(a[0])))
    sample(
        gen,
        _cond(3),
        torch.zeros(1, 1, 16),
        guidance_scale=3.0,
        num_inference_steps=4,
        guidance_cutoff=0.5,
    )
    hook.remove()
    assert batches == [6, 6, 3, 3]


def test_static_shapes_and_uint8_resize_keep_the_images(gens):
    from common.synthesis import from_uint8, to_dataset_format

    gen = gens["ddim"]
    cond, uncond = _cond(5), torch.zeros(1, 1, 16)
    kw = dict(num_inference_steps=2, seed=5, batch_size=4)
    ref = sample(gen, cond, uncond, **kw)
    padded = sample(gen, cond, uncond, static_shapes=True, **kw)
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=0)
    small = sample(gen, cond, uncond, resize_to=(3, 8), as_uint8=True, **kw)
    assert small.dtype == torch.uint8 and small.shape == (5, 3, 8, 8)
    want = to_dataset_format(ref, 3, 8)
    assert float((from_uint8(small) - want).abs().max()) <= 1 / 127.5 + 1e-6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ray_workers_give_the_same_images(tiny_stack_dir):
    import ray

    from common.synthesis_workers import GeneratorSpec, sample_on_workers

    gen = load_generator(str(tiny_stack_dir / "generator"), "ddpm")
    cond, uncond = _cond(9), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=3, seed=11, batch_size=4)
    ref = sample(gen, cond, uncond, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # two actors, each sampling its shard: the same images as one process
        # (one actor is the same code path with one shard)
        spec = GeneratorSpec.of(gen, "ddpm", "fp32")
        x = sample_on_workers(spec, cond, uncond, workers=2, **kw)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    finally:
        ray.shutdown()


def test_extra_guidance_terms_compose(gens):
    """eps_u + w (eps_c - eps_u) + w2 (eps_c - eps_u) is guidance at w + w2; a term
    with weight 0 changes nothing."""
    gen = gens["ddim"]
    cond, uncond = _cond(3), torch.zeros(1, 1, 16)
    kw = dict(num_inference_steps=2, seed=2)
    both = sample(
        gen, cond, uncond, guidance_scale=2.0, extra_conds=[(cond, 1.5)], **kw
    )
    plain = sample(gen, cond, uncond, guidance_scale=3.5, **kw)
    torch.testing.assert_close(both, plain, atol=1e-5, rtol=0)
    other = _cond(6)[3:]
    zero = sample(
        gen, cond, uncond, guidance_scale=2.0, extra_conds=[(other, 0.0)], **kw
    )
    torch.testing.assert_close(
        zero, sample(gen, cond, uncond, guidance_scale=2.0, **kw), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="extra_conds"):
        sample(gen, cond, uncond, extra_conds=[(_cond(2), 1.0)])


def test_generator_spec_rebuilds_the_attached_lora_adapter(tiny_stack_dir):
    """What a Ray worker builds from a spec samples the same images as the
    adapted generator it was taken from (the merged LoRA adapter travels)."""
    from common.lora import attach_lora, get_lora_state, set_lora_state
    from common.synthesis_workers import GeneratorSpec

    gen = load_generator(str(tiny_stack_dir / "generator"), "ddim")
    attach_lora(gen.unet, 2, 2.0, ["to_q", "to_v"], seed=0)
    state = {
        k: v + 0.05 if ".lora_B." in k else v
        for k, v in get_lora_state(gen.unet).items()
    }
    set_lora_state(gen.unet, state, 2, 2.0, ["to_q", "to_v"])
    spec = GeneratorSpec.of(gen, "ddim", "fp32")
    assert spec.lora is not None and spec.lora[1:] == (2, 2.0, ["to_q", "to_v"])
    rebuilt, decoder = spec.build(torch.device("cpu"))
    cond, uncond = _cond(3), torch.zeros(1, 1, 16)
    kw = dict(num_inference_steps=2, seed=4)
    torch.testing.assert_close(
        sample(rebuilt, cond, uncond, **kw),
        sample(gen, cond, uncond, **kw),
        atol=1e-5,
        rtol=0,
    )
    base = load_generator(str(tiny_stack_dir / "generator"), "ddim")
    assert not torch.equal(
        sample(base, cond, uncond, **kw), sample(gen, cond, uncond, **kw)
    )
    assert decoder is None


def test_predicted_x0_inverts_the_forward_process(gens):
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps  =>  x0_hat(x_t, eps) = x0 (hand formula)."""
    from common.synthesis import predicted_x0

    sched = gens["ddpm"].scheduler
    t = torch.tensor(400)
    a = sched.alphas_cumprod[400]
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(predicted_x0(sched, xt, eps, t), x0, atol=1e-5, rtol=0)


def test_latent_guidance_steers_images_per_image_and_reproducibly(gens):
    """A loss pulling every pixel toward +1 brightens the images; a zero loss changes
    nothing; the result does not depend on the batch (per-image losses)."""
    from common.synthesis import LatentGuidance

    gen = gens["ddim"]
    cond, uncond = _cond(5), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=3, seed=3)
    plain = sample(gen, cond, uncond, **kw)
    seen: list[tuple[int, bool]] = []

    def bright(images, rows, warmup):
        seen.append((len(rows), warmup))
        return ((images - 1.0) ** 2).flatten(1).sum(1)

    def zero(images, rows, warmup):
        return images.flatten(1).sum(1) * 0.0

    steer = LatentGuidance(bright, step=0.05, warmup=2)
    guided = sample(gen, cond, uncond, latent_guidance=steer, batch_size=5, **kw)
    assert guided.mean() > plain.mean() + 0.05
    # 2 warm-up moves at the first step, then one move per step
    assert [w for _, w in seen] == [True, True, False, False, False]
    again = sample(gen, cond, uncond, latent_guidance=steer, batch_size=2, **kw)
    torch.testing.assert_close(again, guided, atol=1e-4, rtol=0)
    same = sample(gen, cond, uncond, latent_guidance=LatentGuidance(zero), **kw)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    # `until` guides only the first fraction of the steps
    seen.clear()
    sample(gen, cond, uncond, latent_guidance=LatentGuidance(bright, until=0.3), **kw)
    assert len(seen) == 1


def test_guidance_move_by_hand():
    from common.synthesis import guidance_move

    g = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]], [[1.0, -1.0]]])  # [3, 1, 2]
    # raw: step * grad
    torch.testing.assert_close(guidance_move(g, 0.5, 0.36, False), 0.5 * g)
    # rms per image: sqrt((9 + 16) / 2) = 5 / sqrt(2); sqrt(1 - 0.36) = 0.8
    # -> move = g / (5 / sqrt 2) * 0.5 * 0.8; the zero gradient stays zero;
    # [1, -1] has rms 1 -> [0.4, -0.4]
    out = guidance_move(g, 0.5, torch.tensor(0.36), True)
    r2 = 2**0.5
    want = torch.tensor(
        [[[3 * r2 / 5 * 0.4, 4 * r2 / 5 * 0.4]], [[0.0, 0.0]], [[0.4, -0.4]]]
    )
    torch.testing.assert_close(out, want)
    # each image moves step * sigma in root mean square, whatever its gradient's size
    big = guidance_move(g * 1e6, 0.5, 0.36, True)
    torch.testing.assert_close(big, want)


def test_normalized_latent_guidance_is_batch_independent(gens):
    from common.synthesis import LatentGuidance

    gen = gens["ddim"]
    cond, uncond = _cond(4), torch.zeros(1, 1, 16)
    kw = dict(guidance_scale=2.0, num_inference_steps=3, seed=5)
    plain = sample(gen, cond, uncond, **kw)

    def bright(images, rows, warmup):
        return ((images - 1.0) ** 2).flatten(1).sum(1)

    steer = LatentGuidance(bright, step=0.3, normalize=True)
    a = sample(gen, cond, uncond, latent_guidance=steer, batch_size=4, **kw)
    b = sample(gen, cond, uncond, latent_guidance=steer, batch_size=1, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a.mean() > plain.mean() + 0.05


# ---------------------------------------------------------------- Start (SDEdit)


def test_start_from_latents_is_diffusers_img2img_on_the_same_weights(tmp_path):
    """``Start(z0, strength)`` is StableDiffusionImg2ImgPipeline given latents
    (4 channels: used as they are) with the same per-image generators, prompt
    embeddings and guidance: the same timesteps, the same noise, the same loop."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from tiny_stack import make_tiny_sd

    from common.synthesis import image_generators
    from common.synthesis_start import Start

    gen = load_generator(str(make_tiny_sd(tmp_path / "sd")), scheduler="ddim")
    gen.scheduler = DDIMScheduler.from_config(
        gen.scheduler.config, steps_offset=1, clip_sample=False
    )
    g = torch.Generator().manual_seed(3)
    n, steps, strength, guidance = 3, 4, 0.5, 3.0  # n * strength whole: int = round
    cond = torch.randn(n, 16, 32, generator=g)
    uncond = torch.randn(1, 16, 32, generator=g)
    z0 = torch.randn(n, *gen.sample_shape, generator=g)
    ours = sample(
        gen,
        cond,
        uncond,
        guidance_scale=guidance,
        num_inference_steps=steps,
        seed=5,
        start=Start(z0, strength),
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=gen.vae,
        text_encoder=None,
        tokenizer=None,
        unet=gen.unet,
        scheduler=gen.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=z0.clone(),
        strength=strength,
        prompt_embeds=cond,
        negative_prompt_embeds=uncond.expand(n, -1, -1),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=image_generators(5, range(n)),
        output_type="pt",
    ).images.float()
    torch.testing.assert_close(ours, ref * 2 - 1, atol=2e-4, rtol=0)


@pytest.mark.parametrize("noised", [False, True])
def test_start_is_batch_independent_and_checked(gens, noised):
    from common.synthesis_start import Start

    gen = gens["dpm"]
    cond, uncond = _cond(5), torch.zeros(1, 1, 16)
    z = torch.randn(5, *gen.sample_shape, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=2.0, num_inference_steps=4, seed=3)
    ref = sample(gen, cond, uncond, batch_size=5, start=Start(z, 0.5, noised), **kw)
    x = sample(gen, cond, uncond, batch_size=2, start=Start(z, 0.5, noised), **kw)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    x = sample(
        gen,
        cond,
        uncond,
        batch_size=3,
        static_shapes=True,
        start=Start(z, 0.5, noised),
        **kw,
    )
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    # a lower strength keeps more of the start: closer to it than from noise
    far = sample(gen, cond, uncond, start=Start(z, 1.0, noised), **kw)
    assert (ref - z).abs().mean() < (far - z).abs().mean()
    with pytest.raises(ValueError, match=r"start latents have shape \(4,"):
        sample(gen, cond, uncond, start=Start(z[:4], 0.5, noised), **kw)
    with pytest.raises(ValueError, match="strength=1.5"):
        sample(gen, cond, uncond, start=Start(z, 1.5, noised), **kw)
