"""The CLIP text tower: prompts -> conditioning ``[N, L, D]``.

``pooled`` gives one token per prompt, the L2-normalised projected text embedding
(what OSCAR clients upload; what the embedded generator attends to); ``sequence``
gives the token hidden states Stable Diffusion attends to (77 x 768 for SD 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .weights import EMBEDDED, frozen, load_pretrained, resolve_model, shared

EMBEDDINGS = ("pooled", "sequence")


@dataclass
class TextEncoder:
    """CLIP text tower: prompts -> conditioning ``[N, L, D]`` (L = 1 when pooled)."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def max_length(self) -> int:
        """Tokens a prompt is padded or truncated to."""
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(
            min(self.tokenizer.model_max_length, text_cfg.max_position_embeddings)
        )

    @torch.no_grad()
    def encode(
        self, texts: list[str], kind: str = "pooled", batch_size: int = 256
    ) -> torch.Tensor:
        """Prompts -> conditioning ``[N, L, D]`` on the CPU.

        Parameters
        ----------
        texts : list of str
            The prompts.
        kind : str
            ``pooled``: one token, the unit-norm projected text embedding (L = 1);
            ``sequence``: the last hidden states of the text tower.
        batch_size : int
            Prompts per forward pass.
        """
        if kind not in EMBEDDINGS:
            raise ValueError(
                f"embedding={kind!r} is not one of {', '.join(EMBEDDINGS)}"
            )
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            if kind == "pooled":
                if hasattr(self.model, "get_text_features"):
                    emb = self.model.get_text_features(**batch)
                    emb = getattr(emb, "pooler_output", emb)
                else:  # CLIPTextModel(WithProjection) from an SD checkpoint
                    o = self.model(**batch)
                    emb = getattr(o, "text_embeds", None)
                    emb = o.pooler_output if emb is None else emb
                emb = F.normalize(emb.float(), dim=-1)[:, None, :]
            else:
                tm = getattr(self.model, "text_model", self.model)
                emb = tm(**batch).last_hidden_state.float()
            out.append(emb.cpu())
        return torch.cat(out)


def load_text_encoder(
    name: str = EMBEDDED,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    role: str = "text-encoder",
) -> TextEncoder:
    """Load a CLIP text encoder: a CLIPModel folder, or an SD ``text_encoder``
    subfolder; loaded once per process and shared (``weights.shared``: frozen,
    read-only). ``role`` names the config key in a loading error."""
    path = resolve_model(name, role, "clip")
    model, tokenizer = shared(
        "clip-text",
        path,
        (str(torch.device(device)), dtype),
        lambda: _load_clip_text(path, device, dtype, role),
    )
    return TextEncoder(
        model=model, tokenizer=tokenizer, name=name, device=torch.device(device)
    )


def _load_clip_text(
    path: str, device: torch.device | str, dtype: torch.dtype, role: str
) -> tuple[Any, Any]:
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPModel,
        CLIPTextModelWithProjection,
    )

    sub: dict[str, str] = {}
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        sub = {"subfolder": "text_encoder"}  # a diffusers pipeline folder / hub id
        cfg = load_pretrained(AutoConfig, path, role, **sub)
    if cfg.model_type == "clip":
        model = load_pretrained(CLIPModel, path, role, **sub)
    else:
        model = load_pretrained(CLIPTextModelWithProjection, path, role, **sub)
    tok_sub = {"subfolder": "tokenizer"} if sub else {}
    tokenizer = load_pretrained(AutoTokenizer, path, role, **tok_sub)
    return frozen(model.to(device=device, dtype=dtype)), tokenizer


# ------------------------------------------------- building (pretraining, tests)


def build_tokenizer(words: list[str], max_length: int = 16) -> Any:
    """A word-level tokenizer in HF format (``<bos> words <eos>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def build_clip(
    vocab_size: int,
    *,
    image_size: int = 16,
    channels: int = 1,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    patch_size: int = 4,
    max_length: int = 16,
) -> Any:
    """A small dual encoder in the transformers CLIP format (random weights)."""
    from transformers import CLIPConfig, CLIPModel

    # eos_token_id != 2 so CLIP pools at the <eos> token (2 is transformers' legacy value).
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    return CLIPModel(
        CLIPConfig(
            text_config=text, vision_config=vision, projection_dim=projection_dim
        )
    )
