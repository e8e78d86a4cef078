"""results.json, plots and the per-client table of one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .persist import atomic_write_json


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / "results.json"
    atomic_write_json(path, results)
    return path


def format_table(clients: list[dict[str, Any]]) -> str:
    head = f"{'partition':>9} {'node':>20} {'domain':>9} {'examples':>8} {'upload B':>9} {'accuracy':>8}  status"
    rows = [head, "-" * len(head)]
    for c in sorted(
        clients,
        key=lambda c: (c.get("partition_id") is None, c.get("partition_id") or 0),
    ):
        acc = c.get("accuracy")
        acc_s = f"{acc:8.4f}" if isinstance(acc, float) else f"{'-':>8}"
        rows.append(
            f"{c.get('partition_id', '-'):>9} {c.get('node_id', '-'):>20} "
            f"{str(c.get('domain', '-')):>9} {c.get('num_examples', 0):>8} "
            f"{c.get('upload_bytes', 0):>9} {acc_s}  {c.get('status', '')}"
        )
    return "\n".join(rows)


def plot_accuracy(
    run_dir: Path, clients: list[dict[str, Any]], title: str
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in clients if isinstance(c.get("accuracy"), float)
            and isinstance(c.get("partition_id"), int)]  # fmt: skip
    if not rows:
        return None
    rows.sort(key=lambda c: c["partition_id"])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.2))
    names = [f"{c['partition_id']}\n{c.get('domain', '')}" for c in rows]
    accs = [c["accuracy"] for c in rows]
    bars = ax.bar(names, accs, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{a:.2f}" for a in accs], fontsize=8)
    mean = sum(accs) / len(accs)
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("client (partition, domain)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "accuracy_per_client.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(
    run_dir: Path, samples: dict[tuple[int, int], torch.Tensor], class_names: list[str],
    domains: dict[int, str],
) -> Path | None:  # fmt: skip
    """Grid of synthetic samples: one row per client, one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return None
    owners = sorted({o for o, _ in samples})
    classes = sorted({c for _, c in samples})
    k = max(len(v) for v in samples.values())
    per_row = min(k, 3)
    fig, axes = plt.subplots(
        len(owners), len(classes), figsize=(1.1 * len(classes) * per_row / 2 + 1, 1.2 * len(owners) + 0.6),
        squeeze=False,
    )  # fmt: skip
    for i, o in enumerate(owners):
        for j, c in enumerate(classes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            imgs = samples.get((o, c))
            if imgs is not None:
                tile = torch.cat(list(imgs[:per_row]), dim=-1)  # [C, H, W*k]
                arr = ((tile + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(
                    arr.squeeze(-1) if arr.shape[-1] == 1 else arr,
                    cmap="gray",
                    vmin=0,
                    vmax=1,
                )
            else:
                ax.set_facecolor("#eeeeee")
            if i == 0:
                name = class_names[c] if c < len(class_names) else str(c)
                ax.set_title(name, fontsize=8)
            if j == 0:
                label = "class names" if o < 0 else f"client {o}\n{domains.get(o, '')}"
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("synthetic samples per client (rows) and class (columns)", fontsize=9)
    fig.tight_layout()
    path = run_dir / "synthetic_samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
