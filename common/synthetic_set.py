"""The synthetic training set on disk (``save-synthetic``).

What the server trains on, kept for inspection and reuse: a Hugging Face
``Dataset.save_to_disk`` folder with the columns

* ``image``: ``datasets.Image``, a PNG of the uint8 image in the dataset's
  format (``L`` for one channel, ``RGB`` for three; image-size);
* ``label``: ``datasets.ClassLabel`` with the run's class names;
* ``client``: the partition id the row's condition came from (-1: none);
* ``source``: what conditioned the image (``"oscar:embedding"``, ...).

``datasets.load_from_disk`` opens it, and so does the dataset registry
(``common.datasets.HuggingFaceSource``: an Image and a ClassLabel column), so a
saved set can be a run's ``dataset``. Rows are encoded and written in chunks to
an Arrow file, then saved; the folder appears at once (written beside it, then
renamed), and ``append`` adds rows to a set already there.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SYNTHETIC_DIR = "synthetic"  # <run-dir>/synthetic/
COLUMNS = ("image", "label", "client", "source")
CHUNK_ROWS = 1024  # rows encoded at a time: one chunk of PNGs in memory


def _features(class_names: Sequence[str]) -> Any:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "client": datasets.Value("int64"),
            "source": datasets.Value("string"),
        }
    )


def check_rows(
    labels: torch.Tensor,
    clients: torch.Tensor,
    sources: str | Sequence[str],
    class_names: Sequence[str],
) -> None:
    """Raise ``ValueError`` unless the rows' labels, clients and sources can be
    saved: one of each per row, labels in ``[0, len(class_names))``."""
    n = len(labels)
    if not class_names:
        raise ValueError(
            "class_names is empty: the synthetic set's label column needs the run's "
            "class names (ctx.class_names, from the dataset or the clients' vote)"
        )
    if labels.ndim != 1 or clients.shape != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and clients {tuple(clients.shape)} must "
            "be 1-d with one entry per image"
        )
    if not isinstance(sources, str) and len(sources) != n:
        raise ValueError(
            f"sources has {len(sources)} entries for {n} rows: give one string for "
            "all rows or one per row"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}], outside the "
            f"{len(class_names)} class names {list(class_names)[:5]}"
        )


def _png(image: np.ndarray) -> bytes:
    """One ``[H, W]`` or ``[H, W, 3]`` uint8 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _chunks(
    images: torch.Tensor,
    labels: torch.Tensor,
    clients: torch.Tensor,
    sources: str | Sequence[str],
    rows: int,
) -> Iterator[dict[str, list[Any]]]:
    """The rows as column batches of up to ``rows``, images encoded as PNG."""
    for i in range(0, len(labels), rows):
        x = images[i : i + rows].detach().cpu().permute(0, 2, 3, 1).numpy()
        if x.shape[-1] == 1:
            x = x[..., 0]
        k = len(x)
        yield {
            "image": [{"bytes": _png(a), "path": None} for a in x],
            "label": labels[i : i + k].tolist(),
            "client": clients[i : i + k].tolist(),
            "source": [sources] * k
            if isinstance(sources, str)
            else list(sources[i : i + k]),
        }


def save_synthetic_set(
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    clients: torch.Tensor,
    sources: str | Sequence[str],
    class_names: Sequence[str],
    append: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> Path:
    """Save a labelled synthetic set as a ``save_to_disk`` folder at ``path``.

    Parameters
    ----------
    path
        The folder; replaced if it exists (``append=False``).
    images
        ``[N, C, H, W]`` uint8, ``C`` 1 or 3 (the engine's ``as_uint8`` output).
    labels, clients
        ``[N]`` class ids and the partition id each row comes from (-1: none).
    sources
        What conditioned the images: one string for all rows, or one per row.
    class_names
        The run's classes: the ``ClassLabel``'s names.
    append
        Add the rows to the set already at ``path`` (same class names), if any.

    Returns
    -------
    Path
        ``path``, holding the whole set.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    # 1. Check inputs
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N, C, H, W] with C 1 or 3; got {images.dtype} "
            f"{tuple(images.shape)} (synthesize with as_uint8=True)"
        )
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    check_rows(labels, clients, sources, class_names)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = _features(class_names)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # 2. Encode and write the rows chunk by chunk (one chunk of PNGs in memory)
        rows_file = work / "rows.arrow"
        with ArrowWriter(features=features, path=str(rows_file)) as writer:
            for batch in _chunks(images, labels, clients, sources, chunk_rows):
                writer.write_batch(features.encode_batch(batch))
            writer.finalize()
        ds = datasets.Dataset.from_file(str(rows_file))  # memory-mapped
        # 3. Append to the set already there (memory-mapped, same classes)
        if append and path.exists():
            old = datasets.load_from_disk(str(path))
            if old.features != features:
                raise ValueError(
                    f"append: the set at {path} has features {old.features}, the "
                    f"new rows {features}; save to another path or append=False"
                )
            ds = datasets.concatenate_datasets([old, ds])
        # 4. Save beside the target, then swap it in
        staged = work / "set"
        ds.save_to_disk(str(staged))
        del ds
        if path.exists():
            os.replace(path, work / "replaced")
        os.replace(staged, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
