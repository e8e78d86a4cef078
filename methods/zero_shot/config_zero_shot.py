"""zero-shot's own keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import KeysModel

Prompts = Literal["class-name", "caption-mean", "caption-nearest"]


class ZeroShotConfig(KeysModel):
    """zero-shot's keys: which prompts stand for the classes."""

    zero_shot_prompts: Prompts = Field("class-name")
    """the prompts: `class-name` one per class, the dataset's class prompt (class-names'
    prompt); `caption-mean` one per class, the mean of its phrase-bank captions
    (CLIP's prompt ensembling); `caption-nearest` every phrase-bank caption, a class
    scoring by its nearest (retrieval captioning's class)"""
