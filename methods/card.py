"""A method's card: what README's method table says about it.

Each method folder holds its card as data, ``methods/<name>/card.toml`` (the
keys of :class:`MethodCard`); ``python -m methods docs`` reads it through the
registry with :func:`load_card`. Plain data, validated on loading; no Flower,
no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args

import tomllib

CARD_FILE = "card.toml"

Family = Literal[
    "feature-based", "model-based", "data-based", "diffusion-model FL", "baseline"
]
# The most revealing thing a client sends, from raw to nothing:
#   pixels     images or image-space data (synthetic or distilled images)
#   weights    model weights (a classifier, an adapter)
#   features   embeddings of the client's data (caption / image embeddings,
#              learned descriptions)
#   statistics counts, class names, metrics
#   none       nothing leaves the client
Privacy = Literal["pixels", "weights", "features", "statistics", "none"]
FAMILIES: tuple[str, ...] = get_args(Family)
PRIVACY: tuple[str, ...] = get_args(Privacy)


@dataclass(frozen=True)
class MethodCard:
    """Paper, family, upload and privacy class of one method (README's row).

    ``paper`` is a short citation (authors, venue, year, arXiv id) and
    ``paper_url`` its link; ``code`` the public code it follows (``owner/repo``,
    empty if none); ``uploads`` says what one client sends, ``privacy`` its class
    (see ``Privacy``); ``summary`` is one line on what the server does with it.
    """

    paper: str
    paper_url: str
    family: Family
    uploads: str
    privacy: Privacy
    summary: str
    code: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"family={self.family!r}: use one of {', '.join(map(repr, FAMILIES))}"
            )
        if self.privacy not in PRIVACY:
            raise ValueError(
                f"privacy={self.privacy!r}: use one of {', '.join(map(repr, PRIVACY))}"
            )
        for name in ("paper", "uploads", "summary"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} is empty: say it in one line")
        if self.paper_url and not self.paper_url.startswith("https://"):
            raise ValueError(
                f"paper_url={self.paper_url!r}: give an https:// link (or '')"
            )


def load_card(folder: Path) -> MethodCard | None:
    """The card in ``folder/card.toml``; ``None`` if the folder has none.

    Raises
    ------
    ValueError
        Naming the file and the bad key or value: not TOML, a key that
        :class:`MethodCard` does not have, a missing key, a non-string value,
        or a value its checks refuse.
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not TOML ({e})") from e
    known = {f.name for f in fields(MethodCard)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown}; the keys are {sorted(known)}"
        )
    for key, value in data.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: {key} = {value!r} must be a string")
    try:
        return MethodCard(**data)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{path}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
