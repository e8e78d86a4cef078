"""The hub-model path: tiny random HF models saved to a folder and loaded through
the same from_pretrained code that hub ids and the embedded stack use."""

from __future__ import annotations

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.captioner import load_captioner
from common.generator import load_generator
from common.mnist_domains import phrase_bank
from common.synthesis import sample, to_dataset_format
from common.text_encoder import load_text_encoder


def test_clip_folder_as_text_encoder_and_retrieval_captioner(tiny_stack_dir):
    path = str(tiny_stack_dir / "clip")
    enc = load_text_encoder(path)
    pooled = enc.encode(["a thick digit three", "", "a thin digit one"], "pooled")
    assert pooled.shape == (3, 1, 16)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3, 1), atol=1e-5)
    seq = enc.encode(["a thick digit three"], "sequence")
    assert seq.shape == (1, enc.max_length, 32)
    texts, labels, _ = phrase_bank()
    cap = load_captioner(path, texts, torch.as_tensor(labels))
    caps = cap.caption(torch.zeros(4, 1, 16, 16), torch.tensor([0, 3, 3, 9]))
    # restricted to the given label's captions
    from common.mnist_domains import DIGIT_NAMES

    assert all(DIGIT_NAMES[y] in c for c, y in zip(caps, [0, 3, 3, 9], strict=True))


def test_generator_folder_pixel_space(tiny_stack_dir):
    gen = load_generator(str(tiny_stack_dir / "generator"), scheduler="dpm")
    assert gen.embedding == "pooled" and gen.vae is None
    cond = torch.randn(3, 1, 16)
    a = sample(gen, cond, torch.zeros(1, 1, 16), num_inference_steps=2, seed=1)
    b = sample(gen, cond, torch.zeros(1, 1, 16), num_inference_steps=2, seed=1)
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)  # seeded
    assert a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match=r"needs \[batch, tokens, 16\]"):
        sample(gen, torch.randn(2, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="guidance-scale"):
        sample(gen, cond, torch.zeros(1, 1, 16), guidance_scale=0.5)


def test_guidance_one_runs_only_the_conditional_model(tiny_stack_dir):
    # eps = eps_u + w (eps_c - eps_u) is eps_c at w = 1: one UNet pass per step
    # on the batch instead of two, and the same images as any w with uncond = cond.
    gen = load_generator(str(tiny_stack_dir / "generator"), scheduler="ddim")
    batches: list[int] = []
    hook = gen.unet.register_forward_hook(lambda m, a, o: batches.append(len(a[0])))
    cond = torch.randn(3, 1, 16)
    plain = sample(
        gen,
        cond,
        torch.zeros(1, 1, 16),
        guidance_scale=1.0,
        num_inference_steps=2,
        seed=4,
    )
    assert batches == [3, 3]
    batches.clear()
    same = sample(
        gen, cond, cond[:1], guidance_scale=1.0, num_inference_steps=2, seed=4
    )
    assert torch.equal(plain, same)  # uncond is never used at w = 1
    guided = sample(
        gen, cond[:1], cond[:1], guidance_scale=3.0, num_inference_steps=2, seed=4
    )
    assert batches[-2:] == [2, 2]  # unconditional + conditional halves
    torch.testing.assert_close(guided, plain[:1], atol=1e-5, rtol=0)
    hook.remove()


def test_stable_diffusion_layout_with_vae_and_sequence_conditioning(tmp_path):
    """A diffusers pipeline folder (unet/ vae/ scheduler/ text_encoder/ tokenizer/),
    like a downloaded SD checkpoint, but tiny."""
    make_tiny_sd(tmp_path)
    enc = load_text_encoder(str(tmp_path))  # falls back to the text_encoder/ subfolder
    cond = enc.encode(["a thick digit three"], "sequence")
    assert cond.shape == (1, 16, 32)
    gen = load_generator(str(tmp_path), scheduler="ddim")
    assert gen.embedding == "sequence" and gen.vae is not None
    img = sample(gen, cond, enc.encode([""], "sequence"), num_inference_steps=2)
    assert img.shape == (1, 3, 8, 8)  # decoded by the VAE
    assert to_dataset_format(img, 1, 16).shape == (1, 1, 16, 16)

    # The default lora-targets name modules of SD's UNet: attention projections
    # (self and cross) and the resnets' 3x3 convs, and nothing of the VAE.
    from common.lora import attach_lora, get_lora_state
    from methods.lora.config_lora import LoraConfig

    attach_lora(gen.unet, 4, 4.0, LoraConfig().target_list, seed=0)
    layers = {k.rsplit(".lora_", 1)[0] for k in get_lora_state(gen.unet)}
    for part in (
        "attn1.to_q",
        "attn2.to_v",
        "attn2.to_out.0",
        "resnets.0.conv1",
        "resnets.0.conv2",
    ):
        assert any(name.endswith(part) for name in layers), part
    assert not any("lora" in n for n, _ in gen.vae.named_parameters())


def test_missing_model_error_names_role_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        load_generator(str(missing))
    msg = str(e.value)
    assert "generator=" in msg and str(missing) in msg and "generator='embedded'" in msg
    with pytest.raises(FileNotFoundError, match="text-encoder="):
        load_text_encoder(str(missing))


def test_embedded_dir_env_override(tiny_stack, monkeypatch):
    from common.weights import embedded_dir

    assert embedded_dir() == tiny_stack


def test_a_process_loads_a_read_only_model_once(tiny_stack_dir, tmp_path, monkeypatch):
    """Text encoder, retrieval captioner and image encoder of one CLIP folder
    share one frozen model per process (a simulation worker answers many
    clients); another device, a folder rewritten in place, or
    ONESHOT_SHARE_MODELS=0 gives a fresh load."""
    import shutil

    from common import weights
    from common.captioner import load_image_encoder

    monkeypatch.setattr(weights, "_SHARED", type(weights._SHARED)())
    path = str(shutil.copytree(tiny_stack_dir / "clip", tmp_path / "clip"))
    texts, labels, _ = phrase_bank()
    enc = load_text_encoder(path)
    assert load_text_encoder(path).model is enc.model
    cap = load_captioner(path, texts, torch.as_tensor(labels))
    assert cap.model is enc.model and load_image_encoder(path).model is enc.model
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert load_text_encoder(path, dtype=torch.float64).model is not enc.model
    # the cache holds a few: the least recently used goes
    monkeypatch.setattr(weights, "SHARED_SIZE", 2)
    load_text_encoder(path, dtype=torch.float16)
    assert load_text_encoder(path).model is not enc.model
    enc = load_text_encoder(path)
    # a checkpoint saved again in place is read again (its files' times changed)
    enc.model.save_pretrained(path)
    again = load_text_encoder(path)
    assert again.model is not enc.model
    assert torch.equal(
        again.encode(["a thin digit one"]), enc.encode(["a thin digit one"])
    )
    monkeypatch.setenv("ONESHOT_SHARE_MODELS", "0")
    assert load_text_encoder(path).model is not load_text_encoder(path).model


def test_an_image_encoder_needs_both_towers(tmp_path):
    """A Stable Diffusion text tower (no image tower) is refused as an image
    encoder, with the key, the folder and the fix."""
    from common.captioner import load_image_encoder

    sd = make_tiny_sd(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"image-encoder=.*text tower only.*CLIP"):
        load_image_encoder(str(sd))
