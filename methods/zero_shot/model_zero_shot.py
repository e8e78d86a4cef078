"""The zero-shot classifier: a CLIP image tower and its class prompts' embeddings.

CLIP's zero-shot transfer (Radford et al., ICML 2021, arXiv 2103.00020, 3.1.2):

    logits_k(x) = s * max_{m : c(m) = k} cos(f_img(x), t_m)

with ``f_img`` the image tower (projected embedding), ``t_m`` the text tower's
embedding of prompt ``m``, ``c(m)`` the class it names and ``s =
exp(logit_scale)`` of the same CLIP: ``argmax_k`` is the class of the prompt
nearest to the image (``s`` only sharpens the softmax). With one prompt per
class (CLIP's form) the max is that prompt's cosine.

``ZeroShotClassifier`` is a global classifier like the trained ones: an
``nn.Module`` taking the clients' images (float ``[N, C, S, S]`` in ``[-1, 1]``)
to logits ``[N, K]``, registered as the architecture ``zero-shot``
(``common.models.register_classifier``). Its state dict describes itself:
``encoder_config`` holds the image tower's config (UTF-8 JSON bytes, uint8), so
``build_classifier("zero-shot", C, K)`` builds an empty module and
``load_state_dict`` sizes it before loading the weights; the round's
evaluation, ``global_model/`` and the clients' evaluation take the path every
global classifier takes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.models import register_classifier

ARCH = "zero-shot"
# the buffers of a zero-shot classifier, in ``_fill``'s order
_BUFFERS = (
    "encoder_config",
    "prompts",
    "prompt_classes",
    "logit_scale",
    "pixel_scale",
    "pixel_shift",
)


def zero_shot_logits(
    image_emb: torch.Tensor,
    prompt_emb: torch.Tensor,
    prompt_classes: torch.Tensor,
    num_classes: int,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``logits[n, k] = scale * max_{m : prompt_classes[m] = k} cos(image_n,
    prompt_m)``: ``[N, D]``, ``[M, D]``, ``[M]`` -> ``[N, num_classes]``
    (``-inf`` for a class without a prompt)."""
    if image_emb.shape[-1] != prompt_emb.shape[-1]:
        raise ValueError(
            f"image embeddings have dim {image_emb.shape[-1]}, prompt embeddings "
            f"{prompt_emb.shape[-1]}: both must come from one CLIP"
        )
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(prompt_emb.float(), dim=-1)
    sim = scale * img @ txt.T  # [N, M]
    index = prompt_classes.to(sim.device).long().expand_as(sim)
    out = sim.new_full((len(sim), num_classes), float("-inf"))
    return out.scatter_reduce(1, index, sim, reduce="amax")


def prompt_embeddings(
    text_emb: torch.Tensor, class_ids: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """One unit vector per class: the renormalised mean of the unit embeddings of
    its texts (one text: itself; several: CLIP's prompt ensembling, 3.1.4).

    ``text_emb`` ``[M, D]``, ``class_ids`` ``[M]`` in ``0 .. num_classes - 1``;
    returns ``[num_classes, D]``. A class with no text is an error.
    """
    missing = sorted(set(range(num_classes)) - set(class_ids.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no prompt; give each class one")
    unit = F.normalize(text_emb.float(), dim=-1)
    sums = torch.zeros(num_classes, unit.shape[1]).index_add_(0, class_ids, unit)
    return F.normalize(sums, dim=-1)


def pixel_affine(
    processor_cfg: dict[str, Any] | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per tower channel taking ``[-1, 1]`` to the tower's input,
    as ``common.captioner.prepare_pixels`` does: the identity for the embedded CLIP
    (trained on ``[-1, 1]``), ``((x + 1) / 2 - mean) / std`` for a hub CLIP."""
    if not processor_cfg:
        return torch.ones(channels), torch.zeros(channels)
    mean = torch.tensor(processor_cfg.get("image_mean", [0.5] * 3))[:channels]
    std = torch.tensor(processor_cfg.get("image_std", [0.5] * 3))[:channels]
    return 0.5 / std, (0.5 - mean) / std


def _config_tensor(config: Any) -> torch.Tensor:
    return torch.tensor(list(config.to_json_string().encode()), dtype=torch.uint8)


def _tower(config_bytes: torch.Tensor) -> nn.Module:
    """An image tower (random weights) of the config held in ``config_bytes``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = json.loads(bytes(config_bytes.tolist()).decode())
    return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(cfg)).eval()


class ZeroShotClassifier(nn.Module):
    """CLIP zero-shot over ``num_classes`` prompt embeddings (see the module).

    ``ZeroShotClassifier(C, K)`` is empty (what ``build_classifier`` returns);
    ``from_clip`` builds one from a CLIP model; ``load_state_dict`` fills an empty
    one from a state dict of either.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_encoder: nn.Module | None = None
        self.encoder_config: torch.Tensor
        self.prompts: torch.Tensor
        self.prompt_classes: torch.Tensor
        self.logit_scale: torch.Tensor
        self.pixel_scale: torch.Tensor
        self.pixel_shift: torch.Tensor
        self.register_buffer("encoder_config", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("prompts", torch.zeros(0, 0))  # [M, D]
        self.register_buffer("prompt_classes", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("logit_scale", torch.ones(()))  # s, not its log
        self.register_buffer("pixel_scale", torch.ones(0))  # [tower channels]
        self.register_buffer("pixel_shift", torch.zeros(0))

    @classmethod
    def from_clip(
        cls,
        clip: Any,
        prompts: torch.Tensor,
        prompt_classes: torch.Tensor,
        num_classes: int,
        in_channels: int,
        processor_cfg: dict[str, Any] | None = None,
    ) -> ZeroShotClassifier:
        """The image tower and logit scale of ``clip`` (a transformers
        ``CLIPModel``) over ``prompts`` ``[M, D]`` (its text tower's projected
        embeddings) naming ``prompt_classes`` ``[M]``, every class at least
        once; ``processor_cfg``: a hub CLIP's image mean and std (``None``: the
        embedded CLIP's ``[-1, 1]`` input)."""
        missing = sorted(set(range(num_classes)) - set(prompt_classes.tolist()))
        if missing or len(prompt_classes) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts for {len(prompt_classes)} class ids, "
                f"classes {missing} without one; give every class a prompt"
            )
        from transformers import CLIPVisionModelWithProjection

        vcfg = copy.deepcopy(clip.config.vision_config)
        vcfg.projection_dim = clip.config.projection_dim  # the shared space's dim
        tower = CLIPVisionModelWithProjection(vcfg).eval()
        tower.vision_model.load_state_dict(clip.vision_model.state_dict())
        tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        model = cls(in_channels, num_classes)
        scale, shift = pixel_affine(processor_cfg, vcfg.num_channels)
        model._fill(
            tower.float(),
            _config_tensor(vcfg),
            prompts.detach().float().cpu(),
            prompt_classes.detach().long().cpu(),
            clip.logit_scale.detach().exp().float().cpu(),
            scale,
            shift,
        )
        return model

    def _fill(self, tower: nn.Module, *buffers: torch.Tensor) -> None:
        self.image_encoder = tower
        for name, t in zip(_BUFFERS, buffers, strict=True):
            self.register_buffer(name, t)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Build the tower ``encoder_config`` describes and size the buffers as
        ``state_dict`` has them, then load it (``nn.Module.load_state_dict``)."""
        missing = [k for k in _BUFFERS if k not in state_dict]
        if missing:
            raise KeyError(
                f"state_dict has no {missing}: not a zero-shot classifier's "
                "(build one with ZeroShotClassifier.from_clip)"
            )
        buffers = [torch.empty_like(state_dict[k]) for k in _BUFFERS]
        self._fill(_tower(state_dict["encoder_config"]), *buffers)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[N, D]`` of images in ``[-1, 1]``."""
        if self.image_encoder is None:
            raise RuntimeError(
                "empty ZeroShotClassifier: load a state dict first (load_state_dict)"
            )
        cfg: Any = self.image_encoder.config  # a CLIPVisionConfig
        channels, side = int(cfg.num_channels), int(cfg.image_size)
        x = x.float()
        if x.shape[1] != channels:  # grey <-> RGB
            x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic")
        x = x * self.pixel_scale[:, None, None] + self.pixel_shift[:, None, None]
        return self.image_encoder(pixel_values=x).image_embeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, K]``: ``s`` times the cosine of the nearest prompt
        of each class (``zero_shot_logits``)."""
        return zero_shot_logits(
            self.embed(x),
            self.prompts,
            self.prompt_classes,
            self.num_classes,
            self.logit_scale,
        )


register_classifier(ARCH, ZeroShotClassifier)
