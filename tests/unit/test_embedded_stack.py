"""The committed embedded stack (common/embedded/) loads offline and does its job.

Built by ``python -m bench pretrain`` (bench/pretrain.py); these tests load it
through the same loaders the apps use, with the hub switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.captioner import RetrievalCaptioner, load_captioner
from common.generator import load_generator
from common.mnist_domains import (
    STYLE_WORDS,
    STYLES,
    UNSEEN_STYLES,
    class_name_prompt,
    load_mnist,
    phrase_bank,
    render_style,
    seen_in_pretraining,
    vocabulary,
)
from common.models import load_classifier
from common.synthesis import sample
from common.text_encoder import load_text_encoder
from common.train import predict
from common.weights import embedded_dir

ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def stack() -> dict:
    root = embedded_dir()
    texts, labels, styles = phrase_bank()
    encoder = load_text_encoder("embedded")
    return {
        "root": root,
        "encoder": encoder,
        "captioner": load_captioner("embedded", texts, torch.as_tensor(labels)),
        "generator": load_generator("embedded", scheduler="ddim"),
        "judge": load_classifier(root / "judge"),
        "bank": (texts, torch.as_tensor(labels), styles),
        "uncond": encoder.encode([""], "pooled"),
    }


def style_of(captions: list[str], stack: dict) -> list[str]:
    texts, _, styles = stack["bank"]
    index = {t: i for i, t in enumerate(texts)}
    return [styles[index[c]] for c in captions]


def test_layout_and_size():
    root = embedded_dir()
    for f in (
        "clip/config.json",
        "clip/model.safetensors",
        "clip/tokenizer.json",
        "generator/unet/diffusion_pytorch_model.safetensors",
        "generator/scheduler/scheduler_config.json",
        "generator/conditioning.json",
        "judge/model.safetensors",
        "metrics.json",
        "README.md",
        "samples.png",
    ):
        assert (root / f).is_file(), (
            f"{root / f} is missing: run `python -m bench pretrain`"
        )
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"common/embedded is {size / 1e6:.1f} MB (> 30 MB)"
    assert not list(root.rglob("*.bin")), "weights must be safetensors"


def test_loaders(stack):
    enc = stack["encoder"]
    emb = enc.encode(["a handwritten digit three", "the thin digit one"], "pooled")
    assert emb.shape == (2, 1, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 1))
    assert isinstance(stack["captioner"], RetrievalCaptioner)
    gen = stack["generator"]
    assert gen.embedding == "pooled" and gen.cond_dim == 64 and gen.vae is None
    assert gen.unet.config.sample_size == 16 and gen.unet.config.in_channels == 1
    logits = stack["judge"](torch.zeros(2, 1, 16, 16))
    assert logits.shape == (2, 10)


def retrieval_style_accuracy(stack, style: str, n: int = 100) -> float:
    """MNIST test digits (never seen in pretraining) rendered in ``style``."""
    x, y = load_mnist("test")
    images = render_style(x[:n], style, 16, seed=1)
    caps = stack["captioner"].caption(images, torch.as_tensor(y[:n]))
    return sum(p == style for p in style_of(caps, stack)) / len(caps)


def test_retrieval_gets_the_style_with_labels(stack):
    per_style = {s: retrieval_style_accuracy(stack, s) for s in STYLES if s != "thin"}
    assert sum(per_style.values()) / len(per_style) >= 0.9, per_style
    assert min(per_style.values()) >= 0.85, per_style


@pytest.mark.xfail(
    reason="common.mnist_domains renders 'thin' almost like 'plain' at 16 px (mean |difference| "
    "0.02 in [0, 1], vs 0.13 for 'thick'): retrieval labels it 'plain'",
    strict=False,
)
def test_retrieval_tells_thin_from_plain(stack):
    assert retrieval_style_accuracy(stack, "thin") >= 0.9


@pytest.mark.parametrize("style", ["plain", "inverted", "thick"])
def test_class_conditioned_samples_are_recognised(stack, style):
    """The mean caption embedding of (class, style) - an OSCAR upload - gives that class."""
    texts, labels, styles = stack["bank"]
    n = 8
    conds = []
    for c in range(10):
        rows = [i for i in range(len(texts)) if labels[i] == c and styles[i] == style]
        conds.append(
            stack["encoder"].encode([texts[i] for i in rows]).mean(0, keepdim=True)
        )
    cond = torch.cat(conds).repeat_interleave(n, 0)
    y = torch.arange(10).repeat_interleave(n)
    x = sample(
        stack["generator"],
        cond,
        stack["uncond"],
        guidance_scale=3.0,
        num_inference_steps=15,
        seed=0,
    )
    assert x.shape == (80, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    acc = float((predict(stack["judge"], x) == y).float().mean())
    assert acc >= 0.9, f"judge recognised {acc:.2f} of {style} samples"
    detected = style_of(stack["captioner"].caption(x, y), stack)
    assert sum(d == style for d in detected) / len(detected) >= 0.8, detected


def test_class_name_prompt_gives_plain_digits(stack):
    prompts = [class_name_prompt(c) for c in range(10)]
    cond = stack["encoder"].encode(prompts).repeat_interleave(4, 0)
    y = torch.arange(10).repeat_interleave(4)
    x = sample(
        stack["generator"],
        cond,
        stack["uncond"],
        guidance_scale=3.0,
        num_inference_steps=10,
        seed=1,
    )
    assert float((predict(stack["judge"], x) == y).float().mean()) >= 0.85
    detected = style_of(stack["captioner"].caption(x, y), stack)
    assert sum(d == "plain" for d in detected) / len(detected) >= 0.8, detected


# ``python -m bench pretrain`` with every style it renders recorded: the
# recorder replaces ``render_style`` before any pretraining module imports it
PRETRAIN_RECORDING_STYLES = """
import json, sys
import common.mnist_domains as world
seen, render = set(), world.render_style
def recording(images, style, *args, **kwargs):
    seen.add(style)
    return render(images, style, *args, **kwargs)
world.render_style = recording
from bench.__main__ import main
rc = main(["pretrain", *sys.argv[2:]])
open(sys.argv[1], "w").write(json.dumps(sorted(seen)))
sys.exit(rc)
"""


def _vocabulary(clip_dir: Path) -> set[str]:
    vocab = json.loads((clip_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return {w.lower() for w in vocab}


def test_no_unseen_style_word_is_in_the_shipped_stacks_vocabulary():
    """The shipped stack's text tower never saw a word of the held-out styles
    (nor do the captioner's phrase bank and the pretraining vocabulary hold
    one): their prompts reach it as unknown tokens."""
    words = {w for s in UNSEEN_STYLES for w in STYLE_WORDS[s]}
    assert words and not words & _vocabulary(embedded_dir() / "clip")
    assert not words & set(vocabulary())
    texts, _, styles = phrase_bank()
    assert not set(styles) & set(UNSEEN_STYLES)
    assert not {w for t in texts for w in t.split()} & words
    assert not {seen_in_pretraining(s) for s in UNSEEN_STYLES} - {False}


@pytest.mark.slow
def test_pretrain_quick_end_to_end(tmp_path):
    """``python -m bench pretrain --quick`` writes a stack the loaders accept,
    and no image of a held-out style (``UNSEEN_STYLES``, an unseen transform)
    reaches any part of it (issue 23): every image the pretraining renders, for
    the encoders, the generator, the judge, the FedDiff pool and their
    evaluation, is recorded."""
    out, styles = tmp_path / "stack", tmp_path / "styles.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PRETRAIN_RECORDING_STYLES,
            str(styles),
            "--quick",
            "--out",
            str(out),
            # one torch thread: under pytest-xdist the workers fill the cores,
            # and a second thread only spins against them
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rendered = json.loads(styles.read_text())
    assert set(rendered) == set(STYLES), rendered  # every seen style, nothing else
    assert all(seen_in_pretraining(s) for s in rendered)
    words = {w for s in UNSEEN_STYLES for w in STYLE_WORDS[s]}
    assert not words & _vocabulary(out / "clip")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quick"] and set(metrics["samples"]["per_style"]) == set(STYLES)
    texts, labels, _ = phrase_bank()
    enc = load_text_encoder(str(out / "clip"))
    assert enc.encode(["the digit one"]).shape == (1, 1, 64)
    cap = load_captioner(str(out / "clip"), texts, torch.as_tensor(labels))
    assert len(cap.caption(torch.zeros(3, 1, 16, 16))) == 3
    gen = load_generator(str(out / "generator"))
    x = sample(
        gen, enc.encode(["the digit one"]), enc.encode([""]), num_inference_steps=2
    )
    assert x.shape == (1, 1, 16, 16)
    assert load_classifier(out / "judge")(x).shape == (1, 10)
    assert (out / "samples.png").is_file() and (out / "README.md").is_file()
