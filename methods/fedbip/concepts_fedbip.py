"""FedBiP's concept level, used by both sides: the prompt with a domain slot and
a class slot, and the text tower run with learned token embeddings in them.

The paper's code conditions Stable Diffusion on ``"a X style of a X"`` with the
text encoder's output at the two ``X`` replaced by the learned domain and class
vectors. The embedded generator attends to one pooled vector, which has no
token positions, so the concepts here are learned one step earlier: as token
embeddings at the two slots of the prompt's *input* (textual inversion, Gal et
al. 2023), which the text tower carries into either conditioning (``pooled`` or
``sequence``). Client and server run the same text tower (``text-encoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.datasets import DatasetInfo
from common.text_encoder import EMBEDDINGS, TextEncoder


@dataclass(frozen=True)
class ConceptPrompt:
    """Token ids ``[L]`` and attention mask ``[L]`` of the slotted prompt, and
    the positions of its domain and class slots."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domain_pos: int
    class_pos: int


def template(info: DatasetInfo) -> tuple[str, str]:
    """The words before the domain slot and between the two slots: the
    dataset's styled caption (``"a {style} handwritten digit {name}"`` for
    MNIST's digits, the captions the embedded generator was trained on;
    ``"a {domain} photo of a {name}"`` otherwise)."""
    return ("a", "handwritten digit") if info.digits else ("a", "photo of a")


def token_table(encoder: TextEncoder) -> torch.nn.Embedding:
    """The text tower's input token embeddings (``ConfigError`` if it has none)."""
    model = getattr(encoder.model, "text_model", encoder.model)
    table = getattr(getattr(model, "embeddings", None), "token_embedding", None)
    if not isinstance(table, torch.nn.Embedding):
        raise ConfigError(
            f"text-encoder={encoder.name!r} has no text_model.embeddings."
            "token_embedding: FedBiP learns its concepts there; use a CLIP text tower"
        )
    return table


def token_width(encoder: TextEncoder) -> int:
    """Width ``H`` of one token embedding (a concept's size)."""
    return int(token_table(encoder).embedding_dim)


def _ids(encoder: TextEncoder, text: str) -> list[int]:
    return list(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])


def concept_prompt(encoder: TextEncoder, info: DatasetInfo) -> ConceptPrompt:
    """``<bos> pre [domain] mid [class] <eos>`` padded to the encoder's length.

    The slot ids are the first token of ``pre`` (any ordinary token: its
    embedding is replaced); ``ValueError`` if the prompt does not fit."""
    tok = encoder.tokenizer
    pre, mid = (_ids(encoder, w) for w in template(info))
    if tok.bos_token_id is None or tok.eos_token_id is None or not pre:
        raise ConfigError(
            f"text-encoder={encoder.name!r}: its tokenizer needs bos and eos tokens "
            "and must know the word 'a' (FedBiP's prompt)"
        )
    slot = pre[0]
    ids = [tok.bos_token_id, *pre, slot, *mid, slot, tok.eos_token_id]
    length = encoder.max_length
    if len(ids) > length:
        raise ConfigError(
            f"FedBiP's prompt takes {len(ids)} tokens; text-encoder="
            f"{encoder.name!r} holds {length}"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return ConceptPrompt(
        torch.tensor(ids + [pad] * (length - len(ids))),
        torch.tensor(mask),
        domain_pos=1 + len(pre),
        class_pos=2 + len(pre) + len(mid),
    )


def word_token(encoder: TextEncoder, word: str) -> torch.Tensor:
    """A concept's initial value ``[H]``: the mean input embedding of the
    word's known tokens (``+`` and ``_`` read as spaces), or of the whole table
    when it has none (a style or domain the vocabulary lacks, e.g. ``plain``)."""
    table = token_table(encoder).weight.detach().float().cpu()
    unk = encoder.tokenizer.unk_token_id
    ids = [
        i for i in _ids(encoder, word.replace("+", " ").replace("_", " ")) if i != unk
    ]
    return table[ids].mean(0) if ids else table.mean(0)


def encode_with_concepts(
    encoder: TextEncoder,
    prompt: ConceptPrompt,
    domain: torch.Tensor,
    classes: torch.Tensor,
    kind: str,
) -> torch.Tensor:
    """The conditioning ``[B, L, D]`` of the prompt with ``domain`` ``[B, H]`` and
    ``classes`` ``[B, H]`` as the token embeddings of its two slots.

    The same path as ``TextEncoder.encode`` (``pooled``: the L2-normalised
    projected text embedding, one token; ``sequence``: the last hidden states),
    with gradients to ``domain`` and ``classes`` (wrap in ``torch.no_grad`` to
    sample).
    """
    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding={kind!r} is not one of {', '.join(EMBEDDINGS)}")
    b = len(domain)
    if domain.ndim != 2 or classes.shape != domain.shape or b == 0:
        raise ValueError(
            f"domain {tuple(domain.shape)} and classes {tuple(classes.shape)} must "
            "both be [B, H] with B >= 1"
        )
    dev = encoder.device
    ids = prompt.input_ids.to(dev).expand(b, -1)
    mask = prompt.attention_mask.to(dev).expand(b, -1)
    table = token_table(encoder)

    def put_concepts(_: Any, __: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, prompt.domain_pos] = domain.to(dev, out.dtype)
        out[:, prompt.class_pos] = classes.to(dev, out.dtype)
        return out

    handle = table.register_forward_hook(put_concepts)
    try:
        model = encoder.model
        if kind == "pooled":
            if hasattr(model, "get_text_features"):
                emb = model.get_text_features(input_ids=ids, attention_mask=mask)
                emb = getattr(emb, "pooler_output", emb)
            else:  # CLIPTextModel(WithProjection) from an SD checkpoint
                o = model(input_ids=ids, attention_mask=mask)
                emb = getattr(o, "text_embeds", None)
                emb = o.pooler_output if emb is None else emb
            return F.normalize(emb.float(), dim=-1)[:, None, :]
        tm = getattr(model, "text_model", model)
        return tm(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    finally:
        handle.remove()
