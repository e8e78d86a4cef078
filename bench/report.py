"""What the benchmark reports share: statistics over seeds, cell formats, files.

Used by every benchmark. Every cell formatter writes ``"n/a"`` for a missing
value (``None``), so a report can be written after every run, before all
numbers are in.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def machine() -> str:
    """This machine in words: CPU model, core count, OS (for a timed report)."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU cores, {platform.system()}"


def code_version(root: Path | None = None) -> str:
    """The checkout's commit (short), ``+dirty`` with uncommitted changes;
    ``unknown`` outside git: which code produced a record."""
    import subprocess

    root = root or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def say(msg: str, tag: str = "bench") -> None:
    """Print one progress line, ``[tag] msg``, at once (not buffered)."""
    print(f"[{tag}] {msg}", flush=True)


# ---------------------------------------------------------------- over seeds


def mean(xs: Iterable[float | None]) -> float | None:
    """Mean of the values that are there: ``None`` and NaN are left out.

    Returns ``None`` if no value is left.
    """
    vals = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(vals) / len(vals) if vals else None


def std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); ``None`` below two values."""
    return statistics.stdev(xs) if len(xs) >= 2 else None


# ---------------------------------------------------------------- cells


def num(x: float | None, fmt: str = "{:.2f}") -> str:
    """``x`` in ``fmt`` (a ``str.format`` pattern), or ``"n/a"``."""
    return "n/a" if x is None else fmt.format(x)


def pct(x: float | None, signed: bool = False) -> str:
    """A fraction as percent with one decimal: ``0.123`` -> ``"12.3"`` (``"+12.3"``)."""
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def nbytes(x: float | None) -> str:
    """A byte count with thousands separators: ``1234.0`` -> ``"1,234"``."""
    return num(x, "{:,.0f}")


def mean_std(
    m: float | None, s: float | None, scale: float = 1.0, fmt: str = "{:.2f}"
) -> str:
    """``"m ± s"`` (both times ``scale``, in ``fmt``); ``"m"`` without ``s``."""
    if m is None:
        return "n/a"
    txt = fmt.format(m * scale)
    return txt + (" ± " + fmt.format(s * scale) if s is not None else "")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = [_md_row(header), "|---|" + "---:|" * (len(header) - 1)]
    lines += [_md_row(row) for row in rows]
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------- files


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON through a temporary file, so a reader never sees half.

    Values JSON cannot hold (e.g. a ``Path``) are written as ``str(value)``.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, save it to ``path`` (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
