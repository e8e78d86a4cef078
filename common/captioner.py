"""Captioning on the client: retrieval over a phrase bank (CLIP) or a
captioning network (BLIP-style), both loaded with ``from_pretrained``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .text_encoder import load_text_encoder
from .weights import frozen, load_pretrained, resolve_model, shared


def prepare_pixels(
    images: torch.Tensor, model: Any, processor_cfg: dict | None
) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> the pixel format a CLIP vision tower expects."""
    vcfg = model.config.vision_config
    x = images.float()
    if x.shape[1] != vcfg.num_channels:
        x = x.mean(1, keepdim=True).expand(-1, vcfg.num_channels, -1, -1)
    if x.shape[-1] != vcfg.image_size:
        x = F.interpolate(x, size=(vcfg.image_size, vcfg.image_size), mode="bicubic")
    if processor_cfg:  # a hub CLIP: [0, 1] then its mean/std
        mean = torch.tensor(processor_cfg.get("image_mean", [0.5] * 3))[
            : vcfg.num_channels
        ]
        std = torch.tensor(processor_cfg.get("image_std", [0.5] * 3))[
            : vcfg.num_channels
        ]
        x = ((x + 1) / 2 - mean[:, None, None]) / std[:, None, None]
    return x


@dataclass
class RetrievalCaptioner:
    """Caption an image by the phrase-bank entry closest to it in CLIP space.

    The cheap alternative to a captioning network on edge devices: one image
    forward pass and a dot product with text embeddings computed once. With
    ``labels`` given, only captions of the image's own class compete (the client
    knows its labels; this leaves retrieval to pick the style).
    """

    model: Any
    bank_texts: list[str]
    bank_labels: torch.Tensor
    bank_embeds: torch.Tensor  # [M, D], unit norm
    processor_cfg: dict | None = None

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 512,
    ) -> list[str]:
        """One caption per image: the bank entry of highest cosine similarity.

        Parameters
        ----------
        images : Tensor
            ``[N, C, H, W]`` in ``[-1, 1]``.
        labels : Tensor, optional
            ``[N]`` class ids; only captions of the image's own class compete.
        batch_size : int
            Images per forward pass.
        """
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            px = prepare_pixels(
                images[i : i + batch_size], self.model, self.processor_cfg
            )
            emb = self.model.get_image_features(pixel_values=px.to(self.model.dtype))
            emb = F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1)
            sim = emb @ self.bank_embeds.T
            if labels is not None:
                same = labels[i : i + batch_size, None] == self.bank_labels[None, :]
                sim = sim.masked_fill(~same, float("-inf"))
            out += [self.bank_texts[j] for j in sim.argmax(1).tolist()]
        return out


@dataclass
class GenerativeCaptioner:
    """A captioning network (e.g. BLIP) from the hub or a local folder."""

    model: Any
    processor: Any
    max_new_tokens: int = 20

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        """One generated caption per image (``[N, C, H, W]`` in ``[-1, 1]``);
        ``labels`` is ignored (the network does not take them)."""
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            x = (
                ((images[i : i + batch_size].float() + 1) * 127.5)
                .clamp(0, 255)
                .to(torch.uint8)
            )
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            inputs = self.processor(images=list(x), return_tensors="pt")
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            out += self.processor.batch_decode(ids, skip_special_tokens=True)
        return out


def load_captioner(
    name: str,
    bank_texts: list[str],
    bank_labels: torch.Tensor,
    device: torch.device | str = "cpu",
) -> RetrievalCaptioner | GenerativeCaptioner:
    """CLIP checkpoints caption by retrieval over ``bank_texts``; BLIP-like ones
    generate. The network is loaded once per process and shared (a CLIP with the
    text encoder of the same name: ``load_text_encoder``)."""
    from transformers import AutoConfig

    path = resolve_model(name, "captioner", "clip")
    cfg = load_pretrained(AutoConfig, path, "captioner")
    if cfg.model_type == "clip":
        enc = load_text_encoder(name, device, role="captioner")
        bank = enc.encode(bank_texts, "pooled")[:, 0, :]
        return RetrievalCaptioner(
            enc.model, list(bank_texts), bank_labels.clone(), bank, _pixel_stats(path)
        )
    model, processor = shared(
        "captioner",
        path,
        (str(torch.device(device)),),
        lambda: _load_blip(path, device),
    )
    return GenerativeCaptioner(model, processor)


def _load_blip(path: str, device: torch.device | str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = load_pretrained(AutoModelForImageTextToText, path, "captioner")
    processor = load_pretrained(AutoProcessor, path, "captioner")
    return frozen(model.to(device)), processor


def _pixel_stats(path: str) -> dict | None:
    """A CLIP folder's image normalisation (``preprocessor_config.json``); a hub
    CLIP's is OpenAI's; ``None`` (images as [-1, 1]) for a folder without one."""
    proc_file = Path(path) / "preprocessor_config.json"
    if proc_file.is_file():
        return json.loads(proc_file.read_text())
    if not Path(path).exists():
        return {
            "image_mean": [0.4815, 0.4578, 0.4082],
            "image_std": [0.2686, 0.2613, 0.2758],
        }
    return None


@dataclass
class ImageEncoder:
    """CLIP image tower: images in ``[-1, 1]`` -> L2-normalised projected
    embeddings ``[N, D]`` (the space CLIP's pooled text embeddings live in, up to
    the modality gap)."""

    model: Any
    processor_cfg: dict | None = None

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in ``[-1, 1]`` -> unit-norm image embeddings
        ``[N, D]``."""
        out = []
        for i in range(0, len(images), batch_size):
            px = prepare_pixels(
                images[i : i + batch_size], self.model, self.processor_cfg
            )
            emb = self.model.get_image_features(pixel_values=px.to(self.model.dtype))
            out.append(F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)


def load_image_encoder(name: str, device: torch.device | str = "cpu") -> ImageEncoder:
    """The image tower of a CLIP checkpoint (``embedded``: the stack's dual
    encoder), the same shared model as its text encoder's."""
    path = resolve_model(name, "image-encoder", "clip")
    model = load_text_encoder(name, device, role="image-encoder").model
    if not hasattr(model, "get_image_features"):
        raise ValueError(
            f"image-encoder={name!r}: {path} holds a text tower only "
            f"({type(model).__name__}); an image encoder needs a CLIP with both "
            "towers (embedded, a CLIPModel folder or hub id)"
        )
    return ImageEncoder(model, _pixel_stats(path))
