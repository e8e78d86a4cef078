"""public-only's own keys."""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel


class PublicOnlyConfig(KeysModel):
    """public-only's keys: how many public images it trains on."""

    public_only_images: int = Field(0, ge=0, le=1_000_000)
    """public images the global classifier trains on; 0: as many as class-names
    synthesizes (`images-per-class` per client per class, at most `synth-budget`);
    mnist-domains holds 30,000"""
