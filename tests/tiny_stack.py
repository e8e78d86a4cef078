"""Tiny random foundation models saved in HF format, loaded through the same
``from_pretrained`` path as hub models and the embedded stack."""

from __future__ import annotations

from pathlib import Path

import torch

from common.generator import build_generator, save_generator
from common.mnist_domains import vocabulary
from common.models import SmallCNN, save_classifier
from common.text_encoder import build_clip, build_tokenizer


def make_tiny_stack(root: Path, cond_dim: int = 16) -> Path:
    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    clip = build_clip(len(tok), hidden=32, layers=1, heads=2, projection_dim=cond_dim)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    unet, sched = build_generator(
        cond_dim=cond_dim, block_out_channels=(16, 32), attention_head_dim=4
    )
    save_generator(root / "generator", unet, sched, "pooled")
    save_classifier(SmallCNN(1, 10, width=8), root / "judge", "cnn", 1, 10)
    make_tiny_feddiff(root / "feddiff")
    return root


def tiny_feddiff_settings():
    """FedDiff's builder with tiny settings (seconds): 15 pool checkpoints."""
    from methods.feddiff.model_feddiff import BuildSettings

    return BuildSettings(
        pool_steps=30,
        save_every=2,
        batch=32,
        sgd_lr=0.05,
        latent=16,
        ae_channels=(4, 8),
        ae_steps=120,
        ae_batch=15,
        ae_lr=3e-3,
        denoiser_channels=8,
        denoiser_blocks=2,
        denoiser_train_steps=30,
    )


def make_tiny_feddiff(out: Path) -> dict:
    """FedDiff's pool, autoencoder and latent DDPM, built by the same function as
    the embedded ones (``python -m bench pretrain --stage feddiff``), tiny."""
    from common.mnist_domains import public_styled_set
    from methods.feddiff.model_feddiff import build_feddiff

    full = public_styled_set(image_size=16, seed=0)
    return build_feddiff(
        out,
        full.images[:1000],
        full.labels[:1000],
        full.images[-200:],
        full.labels[-200:],
        tiny_feddiff_settings(),
        seed=0,
    )


def make_tiny_sd(root: Path) -> Path:
    """A diffusers Stable-Diffusion folder (unet/ vae/ scheduler/ text_encoder/
    tokenizer/), like a downloaded SD checkpoint but tiny: latent 4x4x4 decoded to
    3x8x8, conditioned on the 16 x 32 token sequence."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    te = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            projection_dim=32,
        )
    )
    te.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=8,
    ).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")

    return root


FOLDER_CLASSES = ("circle", "cross", "line")


def _digits(n_per_class: int) -> tuple[list, list[int]]:
    """Real MNIST digits 0, 1, 7 as PIL images, standing in for three classes."""
    from PIL import Image

    from common.mnist_domains import mnist_client_pool

    x, y = mnist_client_pool()
    images, labels = [], []
    for label, digit in enumerate((0, 1, 7)):
        for i in (y == digit).nonzero()[0][:n_per_class]:
            images.append(Image.fromarray(x[i]))
            labels.append(label)
    return images, labels


def make_image_folder(root: Path, n_per_class: int = 40) -> Path:
    """``<class>/<image>.png`` with three classes."""
    images, labels = _digits(n_per_class)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (root / FOLDER_CLASSES[y]).mkdir(parents=True, exist_ok=True)
        im.save(root / FOLDER_CLASSES[y] / f"{i}.png")
    return root


def make_hf_dataset(root: Path, n_per_class: int = 40) -> Path:
    """A Hugging Face dataset saved with ``save_to_disk`` (Image + ClassLabel)."""
    import datasets

    images, labels = _digits(n_per_class)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(FOLDER_CLASSES)),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": labels}, features=features
    )
    ds.save_to_disk(str(root))
    return root
