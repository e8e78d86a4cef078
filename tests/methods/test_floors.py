"""The floors: ``public-only`` (the global classifier on the server's public data
alone) and ``zero-shot`` (the stack's CLIP towers, class prompts, no training).

The zero-shot maths against hand-computed values; its classifier against the
CLIP it wraps and through the path every global classifier takes
(``build_classifier`` + ``load_state_dict``, ``save_classifier`` /
``load_classifier``); both server works on the tiny stack, without a Grid.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.config import ConfigError
from common.datasets import dataset_info
from common.mnist_domains import DIGIT_NAMES
from common.models import build_classifier, load_classifier, save_classifier
from common.train import predict
from methods import build_config
from methods.base import ServerContext
from methods.initial import caption_labels
from methods.public_only import PublicOnly
from methods.public_only.server_public_only import train_size
from methods.zero_shot import ZeroShot
from methods.zero_shot.model_zero_shot import (
    ARCH,
    ZeroShotClassifier,
    pixel_affine,
    prompt_embeddings,
    zero_shot_logits,
)


def _ctx(fast_config: dict, tmp_path, **keys) -> ServerContext:
    cfg = build_config(fast_config | keys)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


# ---------------------------------------------------------------- zero-shot maths


def test_an_image_gets_the_class_of_the_nearest_prompt():
    # class 0: one prompt along x; class 1: one along y and one at 45 degrees
    prompts = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    classes = torch.tensor([0, 1, 1])
    images = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.2]])
    logits = zero_shot_logits(images, prompts, classes, 2, scale=10.0)
    r = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [10.0, 10 * r],  # x: cos 1 to class 0, best of class 1 is 45 degrees
            [10 * 0.6, 10 * max(0.8, (0.6 + 0.8) * r)],  # (0.6, 0.8)
            [10 / math.sqrt(1.04), 10 * 1.2 / math.sqrt(1.04) * r],
        ]
    )
    torch.testing.assert_close(logits, expected)
    assert logits.argmax(1).tolist() == [0, 1, 0]


def test_a_class_without_a_prompt_scores_minus_infinity():
    logits = zero_shot_logits(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]), 3
    )
    assert logits[0, 1] == 1.0 and torch.isinf(logits[0, [0, 2]]).all()


def test_embeddings_of_another_width_are_refused():
    with pytest.raises(ValueError, match="one CLIP"):
        zero_shot_logits(torch.ones(1, 3), torch.ones(2, 4), torch.tensor([0, 1]), 2)


def test_prompt_embeddings_average_unit_vectors_per_class():
    emb = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.0, 2.0]])
    out = prompt_embeddings(emb, torch.tensor([0, 0, 1]), 2)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[r, r], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        prompt_embeddings(emb, torch.tensor([0, 0, 1]), 3)


def test_pixel_affine_is_the_identity_or_the_hub_statistics():
    scale, shift = pixel_affine(None, 1)
    assert scale.tolist() == [1.0] and shift.tolist() == [0.0]
    scale, shift = pixel_affine({"image_mean": [0.5], "image_std": [0.25]}, 1)
    x = torch.tensor([-1.0, 0.0, 1.0])  # pixel 0, 127.5, 255
    torch.testing.assert_close(x * scale + shift, ((x + 1) / 2 - 0.5) / 0.25)


# ---------------------------------------------------------------- the classifier


@pytest.fixture
def tiny_clip(tiny_stack):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_stack / "clip").eval()


def _images(n: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 1, 16, 16) * 2 - 1


def test_the_classifier_is_the_nearest_prompt_of_its_clip(tiny_clip):
    torch.manual_seed(0)
    prompts = torch.randn(5, tiny_clip.config.projection_dim)
    classes = torch.tensor([0, 1, 2, 2, 1])
    model = ZeroShotClassifier.from_clip(tiny_clip, prompts, classes, 3, 1)
    x = _images()
    with torch.no_grad():
        img = tiny_clip.get_image_features(pixel_values=x)
        img = getattr(img, "pooler_output", img)
        cos = torch.nn.functional.normalize(img, dim=-1) @ (
            torch.nn.functional.normalize(prompts, dim=-1).T
        )
        logits = model(x)
    assert logits.shape == (12, 3)
    assert predict(model, x).tolist() == classes[cos.argmax(1)].tolist()
    s = tiny_clip.logit_scale.exp()
    torch.testing.assert_close(logits[:, 0], s * cos[:, 0])
    torch.testing.assert_close(logits[:, 2], s * cos[:, 2:4].max(1).values)


def test_the_classifier_takes_the_path_of_every_global_classifier(tiny_clip, tmp_path):
    prompts = torch.randn(3, tiny_clip.config.projection_dim)
    model = ZeroShotClassifier.from_clip(tiny_clip, prompts, torch.arange(3), 3, 1)
    x = _images()
    with torch.no_grad():
        want = model(x)
    # the round's evaluation: build the architecture, load the state dict
    built = build_classifier(ARCH, 1, 3)
    with pytest.raises(RuntimeError, match="load a state dict first"):
        built(x)
    built.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(built.eval()(x), want)
    # global_model/: config.json + model.safetensors, loaded by load_classifier
    save_classifier(built, tmp_path / "gm", ARCH, 1, 3, class_names=["a", "b", "c"])
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(tmp_path / "gm")(x), want)
    with pytest.raises(KeyError, match="encoder_config"):
        build_classifier(ARCH, 1, 3).load_state_dict({"prompts": prompts})


def test_rgb_images_reach_a_grey_tower(tiny_clip):
    model = ZeroShotClassifier.from_clip(
        tiny_clip,
        torch.randn(2, tiny_clip.config.projection_dim),
        torch.arange(2),
        2,
        3,
    )
    grey = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(model(grey.expand(-1, 3, -1, -1)), model(grey))


# ---------------------------------------------------------------- zero-shot server


def test_zero_shot_server_work_builds_the_nearest_class_prompt_classifier(
    tiny_stack, fast_config, tmp_path
):
    from common.captioner import load_image_encoder

    ctx = _ctx(fast_config, tmp_path, method="zero-shot")
    method = ZeroShot()
    method.check(ctx)
    out = method.server_work([], ctx)
    assert out.arch == ARCH and out.model_state is not None
    assert out.extra["zero_shot"]["prompts"] == "class-name"
    assert out.extra["zero_shot"]["prompt_vectors"] == 10
    assert "encode" in out.timings
    model = build_classifier(out.arch, ctx.channels, ctx.num_classes)
    model.load_state_dict(out.model_state)
    # the same prediction, computed from the two towers directly
    assert ctx.info is not None
    prompts = [ctx.info.class_prompt(c) for c in range(10)]
    text = ctx.text_encoder.encode(prompts, "pooled")[:, 0, :]
    x = _images(20)
    img = load_image_encoder("embedded").encode(x)
    assert predict(model, x).tolist() == (img @ text.T).argmax(1).tolist()


@pytest.mark.parametrize("how, vectors", [("caption-mean", 10), ("caption-nearest", 0)])
def test_zero_shot_phrase_bank_prompts(tiny_stack, fast_config, tmp_path, how, vectors):
    ctx = _ctx(fast_config, tmp_path, method="zero-shot", **{"zero-shot-prompts": how})
    out = ZeroShot().server_work([], ctx)
    assert ctx.info is not None
    bank, _ = ctx.info.phrase_bank()
    zs = out.extra["zero_shot"]
    assert zs["texts"] == len(bank) and zs["prompt_vectors"] == (vectors or len(bank))


def test_zero_shot_refuses_a_text_only_encoder(tiny_stack, fast_config, tmp_path):
    sd = make_tiny_sd(tmp_path / "sd")
    ctx = _ctx(fast_config, tmp_path, method="zero-shot", **{"text-encoder": str(sd)})
    with pytest.raises(ConfigError, match="text-encoder=.*text tower only"):
        ZeroShot().check(ctx)


# ---------------------------------------------------------------- public only


def test_caption_labels_read_the_class_from_the_phrase_bank(fast_config, tmp_path):
    info = _ctx(fast_config, tmp_path).info
    assert info is not None
    labels = caption_labels(["the digit seven", "a thick handwritten digit two"], info)
    assert labels is not None and labels.tolist() == [7, 2]
    assert caption_labels(["a cat"], info) is None


def test_public_only_trains_on_labelled_public_images(
    tiny_stack, fast_config, tmp_path
):
    from common.datasets import public_pairs

    ctx = _ctx(
        fast_config,
        tmp_path,
        method="public-only",
        **{"public-only-images": 60, "train-epochs": 1},
    )
    method = PublicOnly()
    method.check(ctx)
    images, labels = method._public  # all of them: it draws its 60 from these
    _, captions = public_pairs(ctx.cfg.data_args(), len(labels))  # type: ignore[misc]
    assert images.shape[1:] == (1, 16, 16) and len(labels) == len(images) > 60
    assert all(
        DIGIT_NAMES[y] in c for y, c in zip(labels.tolist(), captions, strict=True)
    )
    # by default as many as class-names synthesizes, at most synth-budget
    small = _ctx(fast_config, tmp_path, **{"images-per-class": 4, "synth-budget": 100})
    assert train_size(small, 2) == 4 * 2 * 10 and train_size(small, 3) == 100
    assert train_size(small, 0) == 100
    out = method.server_work([], ctx)
    assert out.arch == "cnn" and out.model_state is not None
    assert out.extra["public_only"]["images"] == 60
    assert sum(out.extra["public_only"]["per_class"]) == 60
    assert "train" in out.timings
    build_classifier(out.arch, 1, 10).load_state_dict(out.model_state)


def test_public_only_refuses_a_dataset_without_public_data(fast_config, tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("L", (16, 16)).save(tmp_path / "data" / c / "0.png")
    ctx = _ctx(
        fast_config, tmp_path, method="public-only", dataset=str(tmp_path / "data")
    )
    with pytest.raises(ConfigError, match="public images the server holds"):
        PublicOnly().check(ctx)
