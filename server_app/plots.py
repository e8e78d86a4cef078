"""The run's two plots: accuracy (the global model per domain beside each
client) and the grid of synthetic samples (a row per client, a column per
class). Both are bounded in size whatever the fleet; client text in a label is
escaped and cut (``plot_label``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.contract import safe_text

from .tables import client_order

PLOT_BARS = 20  # above this many clients the accuracy plot shows domains
GRID_ROWS = 12  # above this many clients the sample grid shows a few per domain
PLOT_DOMAINS = 12  # most domains a plot shows (client-chosen strings); the rest: other
PLOT_DPI = 100
PLOT_MAX_W_IN = 14.0  # the accuracy plot is at most 1,400 px wide, 380 px high
GRID_CLASSES = 20  # most classes (columns) the sample grid shows
GRID_MAX_PX = 1300  # the sample mosaic is at most this many px wide and high


def plot_label(x: Any, n: int = 20) -> str:
    """Client text for a matplotlib label: escaped, cut to ``n`` characters, no
    mathtext (a ``$`` in a client's domain is text, not a formula to parse)."""
    s = safe_text(x, 400)
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("$", r"\$")


def _by_domain(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Client accuracies by domain. A domain is whatever a client says: above
    ``PLOT_DOMAINS`` domains, the largest ones holding at least 1% of the clients
    are kept and the rest pooled as one group, last."""
    by: dict[str, list[float]] = {}
    for c in rows:
        by.setdefault(safe_text(c.get("domain") or "-", 20), []).append(c["accuracy"])
    if len(by) <= PLOT_DOMAINS:
        return dict(sorted(by.items()))
    big = [d for d in by if 100 * len(by[d]) >= len(rows)]
    keep = sorted(sorted(big, key=lambda d: (-len(by[d]), d))[: PLOT_DOMAINS - 1])
    rest = [a for d, accs in by.items() if d not in keep for a in accs]
    return {d: by[d] for d in keep} | {f"{len(by) - len(keep)} others": rest}


def plot_accuracy(
    run_dir: Path,
    clients: list[dict[str, Any]],
    title: str,
    global_accuracy: float | None = None,
    global_per_domain: dict[str, float] | None = None,
    global_test_size: int = 0,
) -> Path | None:
    """The global model's accuracy per domain beside each client's accuracy.

    Left: the global model on the global test set, a bar per domain and the
    overall accuracy as a line. Right: a bar per client (colored by domain) up
    to ``PLOT_BARS`` clients, else a box of client accuracies per domain. At
    most ``PLOT_MAX_W_IN`` inches wide at ``PLOT_DPI``, whatever the fleet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. What each panel shows
    rows = [
        c
        for c in clients
        if isinstance(c.get("accuracy"), float) and not client_order(c)[0]
    ]
    rows.sort(key=lambda c: c["partition_id"])
    has_global = isinstance(global_accuracy, float)
    per_domain = {
        str(d): float(a)
        for d, a in (global_per_domain or {}).items()
        if isinstance(a, int | float)
    }
    gdoms = list(per_domain)[:PLOT_DOMAINS]
    groups = _by_domain(rows)
    if not rows and not has_global:
        return None
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {
        d: palette[i % len(palette)]
        for i, d in enumerate(dict.fromkeys(gdoms + list(groups)))
    }
    bars = len(rows) <= PLOT_BARS
    widths = []
    if has_global:
        widths.append(1.2 + 0.6 * max(1, len(gdoms)))
    if rows:
        widths.append(1.2 + (0.5 * len(rows) if bars else 0.9 * len(groups)))

    # 2. The figure: panel widths follow their bar counts, the whole is bounded
    fig_w = min(PLOT_MAX_W_IN, max(8.5, 0.6 + sum(widths)))
    fig, axes = plt.subplots(
        1, len(widths), figsize=(fig_w, 3.8), squeeze=False, width_ratios=widths
    )
    panels = list(axes[0])
    if has_global:
        assert global_accuracy is not None
        ax = panels.pop(0)
        names = gdoms or ["all"]
        vals = [per_domain[d] for d in gdoms] or [global_accuracy]
        drawn = ax.bar(
            range(len(names)),
            vals,
            color=[colour.get(d, palette[0]) for d in names],
            width=0.7,
        )
        ax.bar_label(drawn, labels=[f"{v:.2f}" for v in vals], fontsize=8)
        ax.axhline(
            global_accuracy, color="k", lw=1.2, label=f"overall {global_accuracy:.3f}"
        )
        ax.set_xticks(
            range(len(names)),
            [plot_label(d, 12) for d in names],
            fontsize=8,
            rotation=30 if len(names) > 6 else 0,
        )
        size = f", {global_test_size:,} images" if global_test_size else ""
        ax.set_title(f"global model\nglobal test set{size}", fontsize=9)
        ax.set_xlabel("domain", fontsize=8)
    if rows:
        ax = panels.pop(0)
        accs = [c["accuracy"] for c in rows]
        mean = sum(accs) / len(accs)
        if bars:
            doms = [safe_text(c.get("domain") or "-", 20) for c in rows]
            drawn = ax.bar(
                range(len(rows)),
                accs,
                width=0.7,
                color=[colour.get(d, palette[0]) for d in doms],
            )
            if len(rows) <= 12:
                ax.bar_label(drawn, labels=[f"{a:.2f}" for a in accs], fontsize=7)
            short = 12 if len(rows) <= 8 else 6
            ax.set_xticks(
                range(len(rows)),
                [
                    f"{c['partition_id']}\n{plot_label(d, short)}"
                    for c, d in zip(rows, doms, strict=True)
                ],
                fontsize=7,
            )
            ax.set_xlabel("client (partition, domain)", fontsize=8)
            ax.set_title(
                f"{len(rows)} clients\neach on its held-out test set", fontsize=9
            )
        else:  # a fleet: one box of client accuracies per domain
            boxes = ax.boxplot(
                list(groups.values()), showmeans=True, patch_artist=True, widths=0.6
            )
            for patch, d in zip(boxes["boxes"], groups, strict=True):
                patch.set_facecolor(colour.get(d, palette[0]))
                patch.set_alpha(0.8)
            ax.set_xticks(
                range(1, len(groups) + 1),
                [f"{plot_label(d, 12)}\n({len(g)})" for d, g in groups.items()],
                fontsize=7,
                rotation=30 if len(groups) > 6 else 0,
            )
            ax.set_xlabel("domain (clients)", fontsize=8)
            ax.set_title(
                f"{len(rows)} clients by domain\neach on its held-out test set",
                fontsize=9,
            )
        ax.axhline(mean, color="k", ls="--", lw=1, label=f"client mean {mean:.3f}")
    for i, ax in enumerate(axes[0]):
        ax.set_ylim(0, 1.18)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(loc="upper right", fontsize=8, frameon=False)
        if i == 0:
            ax.set_ylabel("accuracy", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = run_dir / "accuracy_per_client.png"
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _grid_rows(owners: list[int], domains: dict[int, str]) -> list[int]:
    """At most ``GRID_ROWS`` clients: all of them, or the first few of each domain."""
    if len(owners) <= GRID_ROWS:
        return owners
    by: dict[str, list[int]] = {}
    for o in owners:  # owners are sorted: each domain's list is too
        by.setdefault(domains.get(o, ""), []).append(o)
    per_domain = max(1, GRID_ROWS // len(by))
    kept = [o for d in sorted(by) for o in by[d][:per_domain]]
    return sorted(kept)[:GRID_ROWS]


def _tile(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One image in [-1, 1], ``[C, H', W']``, as ``[h, w, 3]`` in [0, 1]."""
    x = torch.nan_to_num(img.detach().float().cpu())
    if x.dim() == 2:
        x = x[None]
    if x.shape[-2:] != (h, w):
        x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear")[0]
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    return ((x + 1) / 2).clamp(0, 1).permute(1, 2, 0)


@dataclass
class Mosaic:
    """The sample grid as one image: equal cells of ``per_cell`` images side by
    side on a grey ground, ``gap`` px of white between cells."""

    image: torch.Tensor  # [H, W, 3] in [0, 1]
    cell_h: int
    cell_w: int
    gap: int
    empty: list[tuple[int, int]]  # (row, column) of the cells without images

    def origin(self, i: int, j: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of the cell of row ``i``, column ``j``."""
        return self.gap + i * (self.cell_h + self.gap), self.gap + j * (
            self.cell_w + self.gap
        )


CELL_GROUND = 0.92  # grey of a cell's free space (and of a cell without images)


def sample_mosaic(
    samples: dict[tuple[int, int], torch.Tensor],
    owners: list[int],
    classes: list[int],
    per_cell: int = 3,
) -> Mosaic:
    """Rows ``owners``, columns ``classes``; every cell the size of ``per_cell``
    images (or of the most any cell has, if fewer), whatever its own count.
    Images of another size than the first are resized to it."""
    first = next(iter(samples.values()))[0]
    h, w = int(first.shape[-2]), int(first.shape[-1])
    per_cell = max(1, min(per_cell, max(len(v) for v in samples.values())))
    gap, inner = max(2, h // 4), max(1, h // 16)
    cell_w = per_cell * w + (per_cell - 1) * inner
    m = Mosaic(
        torch.ones(
            gap + len(owners) * (h + gap), gap + len(classes) * (cell_w + gap), 3
        ),
        h,
        cell_w,
        gap,
        [],
    )
    for i, o in enumerate(owners):
        for j, c in enumerate(classes):
            y, x = m.origin(i, j)
            m.image[y : y + h, x : x + cell_w] = CELL_GROUND
            imgs = samples.get((o, c))
            if imgs is None or not len(imgs):
                m.empty.append((i, j))
                continue
            for k, img in enumerate(imgs[:per_cell]):
                x0 = x + k * (w + inner)
                m.image[y : y + h, x0 : x0 + w] = _tile(img, h, w)
    return m


def plot_samples(
    run_dir: Path,
    samples: dict[tuple[int, int], torch.Tensor],
    class_names: list[str],
    domains: dict[int, str],
) -> Path | None:
    """Grid of synthetic samples: one row per client, one column per class.

    Every cell is the same size (``sample_mosaic``); a (client, class) without
    images reads 'no data' (or '×' where that does not fit). Bounded: at most
    ``GRID_ROWS`` clients (a few per domain), ``GRID_CLASSES`` classes, and a
    mosaic of at most ``GRID_MAX_PX`` pixels a side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = {k: v for k, v in samples.items() if len(v)}
    if not samples:
        return None
    # 1. Rows (clients) and columns (classes), bounded; one mosaic of equal cells
    all_owners = sorted({o for o, _ in samples})
    owners = _grid_rows(all_owners, domains)
    all_classes = sorted({c for _, c in samples})
    classes = all_classes[:GRID_CLASSES]
    # about 30 images a row: three per class up to 10 classes, fewer above
    m = sample_mosaic(samples, owners, classes, per_cell=30 // len(classes))

    # 2. Scale: about 56 px per image, the mosaic within GRID_MAX_PX a side
    mh, mw = int(m.image.shape[0]), int(m.image.shape[1])
    s = min(56 / m.cell_h, GRID_MAX_PX / mw, GRID_MAX_PX / mh)
    s = float(int(s)) if s >= 1 else s
    left, top, right, bottom = 120, 70, 16, 12  # px, for the labels
    fig_w = max(480, left + mw * s + right)
    fig_h = top + mh * s + bottom
    fig = plt.figure(figsize=(fig_w / PLOT_DPI, fig_h / PLOT_DPI), dpi=PLOT_DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, mw * s / fig_w, mh * s / fig_h))
    ax.imshow(m.image.numpy(), interpolation="nearest", aspect="auto")

    # 3. Labels: classes on top, clients (and their domains) on the left
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0, labelsize=8)
    ax.xaxis.tick_top()
    wide = m.cell_w * s >= 70
    names = [
        plot_label(class_names[c] if c < len(class_names) else c, 12) for c in classes
    ]
    ax.set_xticks(
        [m.origin(0, j)[1] + m.cell_w / 2 for j in range(len(classes))],
        names,
        rotation=0 if wide else 45,
        ha="center" if wide else "left",
    )
    sep = "\n" if m.cell_h * s >= 30 else " "  # two lines where a row has room
    ax.set_yticks(
        [m.origin(i, 0)[0] + m.cell_h / 2 for i in range(len(owners))],
        [
            "class names"
            if o < 0
            else f"client {o}{sep}{plot_label(domains.get(o, ''), 14)}"
            for o in owners
        ],
    )
    roomy = m.cell_w * s >= 48 and m.cell_h * s >= 14
    for i, j in m.empty:
        y, x = m.origin(i, j)
        ax.text(
            x + m.cell_w / 2,
            y + m.cell_h / 2,
            "no data" if roomy else "×",
            ha="center",
            va="center",
            fontsize=7 if roomy else 9,
            color="#777777",
        )
    shown = []
    if len(owners) < len(all_owners):
        shown.append(f"{len(owners)} of {len(all_owners)} clients (a few per domain)")
    if len(classes) < len(all_classes):
        shown.append(f"the first {len(classes)} of {len(all_classes)} classes")
    fig.text(
        0.5,
        1 - 8 / fig_h,
        "synthetic samples per client (rows) and class "
        f"(columns){': ' + ', '.join(shown) if shown else ''}",
        ha="center",
        va="top",
        fontsize=9,
    )
    path = run_dir / "synthetic_samples.png"
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
