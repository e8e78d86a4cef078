"""README's results block (``python -m bench readme``), checked by hand on a
small report and against the committed one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.accuracy import headline as H

ROOT = Path(__file__).resolve().parents[2]


def _run(method: str, seed: int, seen: float, unseen: float) -> dict[str, Any]:
    per = {"inverted": seen, "thick": seen, "outline": unseen, "striped": unseen}
    return {
        "method": method,
        "seed": seed,
        "ok": True,
        "global_accuracy": (seen + unseen) / 2,
        "global_accuracy_per_domain": per,
        "upload_bytes_per_client": 1000.0 + seed,
    }


REPORT = {
    "world": "held-out",
    "num_clients": 4,
    "seeds": [0, 1],
    "quick": True,
    "machine": "a test CPU",
    "wall_time_s": {"total": 7200.0},
    "methods": ["m", "public-only", "zero-shot"],
    "runs": [
        _run("m", 0, 0.80, 0.30),
        _run("m", 1, 0.80, 0.32),
        _run("public-only", 0, 0.90, 0.20),
        _run("public-only", 1, 0.90, 0.24),
        _run("zero-shot", 0, 0.60, 0.35),
        _run("zero-shot", 1, 0.60, 0.37),
    ],
}


def test_the_headline_row_by_hand():
    """m on the unseen domains: 0.30, 0.32 -> 31.0, sd 1.414, se 1.0, t(0.975, 1)
    = 12.706: [18.3, 43.7]. Against public-only: differences +10, +8 -> +9.0
    [-3.7, +21.7], not shown above it. Against zero-shot: -5, -5 -> -5.0 with no
    spread [-5.0, -5.0]: not above it, and the table says so."""
    text = "\n".join(H.headline(REPORT))
    assert "2.0 h on a test CPU" in text and "unseen: outline, striped" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| m |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "m",
        "80.0",  # no spread on the seen domains: the mean alone, exact
        "31.0 [18.3, 43.7]",
        "+9.0 [-3.7, +21.7]",
        "-5.0 [-5.0, -5.0]",
        "not shown above public-only; **not above zero-shot**",
        "1,000",
    ]
    assert "| **public-only** | 90.0 | 22.0 [-3.4, 47.4] |  |  | floor |" in text
    # the floors first, then by accuracy on the unseen domains
    names = [
        ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ")
    ]
    assert names[1:4] == ["**zero-shot**", "**public-only**", "m"]


def test_splice_replaces_only_the_block():
    text = f"a\n{H.BEGIN}\nold\n{H.END}\nb\n"
    new = H.splice(text, ["x", "y"])
    assert new.startswith(f"a\n{H.BEGIN}\n<!-- generated") and new.endswith(
        f"x\ny\n{H.END}\nb\n"
    )
    assert H.splice(new, ["x", "y"]) == new


def test_readme_results_block_is_the_committed_headline_report():
    """README's results table is the held-out bench's, as committed."""
    assert (ROOT / H.HEADLINE).is_file()
    assert H.main(["--check"]) == 0
