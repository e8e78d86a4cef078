"""What a user takes home from a run: ``<run_dir>/global_model/``.

``results.json`` reports the run and ``checkpoints/`` is the server's resume
state; ``global_model/`` is the global model in formats other tools load:

* a round with a global classifier (``ServerOutput.model_state``: oscar,
  class-names, fedavg, feddisc, fedlmg, feddeo, feddiff, dense, ...):
  ``config.json`` + ``model.safetensors`` (``common.models.save_classifier``:
  architecture, class names, image size, the input convention, method, dataset,
  global accuracy). ``common.models.load_classifier(path)`` loads it;
  ``common.models.classify(path, ["a.png"])`` names the classes of image files.
* a LoRA round (the merged adapter it pushes back): diffusers'
  ``pytorch_lora_weights.safetensors`` (``common.lora.save_diffusers_lora``),
  loaded by ``pipeline.load_lora_weights(path)`` on the run's base generator
  (``unet.load_lora_adapter(path, weight_name=LORA_WEIGHTS, prefix="unet")``
  on a bare UNet), a
  ``config.json`` saying which base, rank, alpha and merge, and the global
  classifier in ``classifier/``.

The folder is written into a hidden temporary folder beside it and renamed into
place, so a reader never sees half a model; writing again (a resumed run)
replaces it with the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from common.contract import safe_text
from methods.base import ServerContext, ServerOutput
from methods.lora import payload_lora

from .persist import atomic_write_json

GLOBAL_MODEL = "global_model"
CLASSIFIER = "classifier"  # a LoRA round's classifier, inside global_model/
_TMP = ".global_model."  # prefix of the temporary and the replaced folders

Adapter = tuple[dict[str, torch.Tensor], int, float]  # (state, rank, alpha)


def merged_adapter(out: ServerOutput) -> Adapter | None:
    """``(state, rank, alpha)`` of the LoRA adapter a round pushes back, or None.

    The adapter is the ``adapter/`` part of the pushed ``lora`` record
    (``methods.lora.payload_lora``); its rank and alpha travel in the push
    config (``lora-rank``, ``lora-alpha``).
    """
    arrays = out.push_arrays.get(payload_lora.RECORD)
    state = payload_lora.adapter_of(arrays) if arrays else {}
    if not state:
        return None
    rank, alpha = out.push_config.get("lora-rank"), out.push_config.get("lora-alpha")
    if rank is None or alpha is None:
        raise ValueError(
            "the pushed LoRA adapter has no lora-rank / lora-alpha in the push "
            f"config ({sorted(out.push_config)}); the server work must set both"
        )
    return state, int(rank), float(alpha)


def save_global_model(
    run_dir: Path,
    out: ServerOutput,
    ctx: ServerContext,
    method_name: str,
    global_accuracy: float | None = None,
) -> Path | None:
    """Write ``<run_dir>/global_model/`` from the server's output.

    Parameters
    ----------
    run_dir : Path
        The run's folder.
    out : ServerOutput
        The server work's output (or ``persist.load_output`` of the run).
    ctx : ServerContext
        With ``info`` known (after validation): channels and class names.
    method_name : str
        Recorded in ``config.json``.
    global_accuracy : float, optional
        The global classifier's accuracy on the global test set, if measured
        (``record_global_accuracy`` adds it later).

    Returns
    -------
    Path or None
        The folder; ``None`` where the round has no global model (``local``),
        or the model could not be written (logged with the reason: an export
        must not lose the round's results).
    """
    try:
        adapter = merged_adapter(out)
        if out.model_state is None and adapter is None:
            log(INFO, "No global model to write (method=%s)", method_name)
            return None
        return _replace_dir(
            Path(run_dir) / GLOBAL_MODEL,
            lambda tmp: _write(tmp, out, adapter, ctx, method_name, global_accuracy),
        )
    except (OSError, ValueError, RuntimeError) as e:
        # RuntimeError: a state dict that does not fit the architecture
        log(
            WARNING,
            "global_model/ not written: %s: %s",
            e.__class__.__name__,
            safe_text(e, 500),
        )
        return None


def record_global_accuracy(run_dir: Path, accuracy: float | None) -> Path | None:
    """Put ``global_accuracy`` into the exported classifier's ``config.json``
    (``global_model/`` or ``global_model/classifier/``); returns that file, or
    ``None`` where no classifier was exported."""
    root = Path(run_dir) / GLOBAL_MODEL
    for folder in (root, root / CLASSIFIER):
        file = folder / "config.json"
        if not file.is_file():
            continue
        cfg = json.loads(file.read_text())
        if "arch" in cfg:
            cfg["global_accuracy"] = accuracy
            atomic_write_json(file, cfg)
            return file
    return None


def _write(
    path: Path,
    out: ServerOutput,
    adapter: Adapter | None,
    ctx: ServerContext,
    method_name: str,
    global_accuracy: float | None,
) -> None:
    """The contents of ``global_model/``, written into the empty folder ``path``."""
    has_classifier = out.model_state is not None
    if adapter is not None:
        _write_adapter(path, adapter, ctx, method_name, has_classifier)
    if has_classifier:
        folder = path / CLASSIFIER if adapter is not None else path
        _write_classifier(folder, out, ctx, method_name, global_accuracy)


def _write_classifier(
    path: Path,
    out: ServerOutput,
    ctx: ServerContext,
    method_name: str,
    global_accuracy: float | None,
) -> None:
    from common.models import classifier_from_state, save_classifier

    assert out.model_state is not None
    # built and loaded as the round evaluates it (round.evaluate_global): a state
    # that does not fit raises here, not in a user's hands
    model = classifier_from_state(
        out.arch, out.model_state, ctx.channels, ctx.num_classes
    )
    save_classifier(
        model,
        path,
        out.arch,
        ctx.channels,
        ctx.num_classes,
        class_names=ctx.class_names or None,
        image_size=ctx.cfg.image_size,
        extra={
            "method": method_name,
            "dataset": ctx.cfg.dataset,
            "global_accuracy": global_accuracy,
        },
    )


def _write_adapter(
    path: Path,
    adapter: Adapter,
    ctx: ServerContext,
    method_name: str,
    has_classifier: bool,
) -> None:
    from common.lora import LORA_WEIGHTS, save_diffusers_lora

    state, rank, alpha = adapter
    save_diffusers_lora(path, state, rank, alpha)
    cfg = ctx.cfg
    # the base's fingerprint where the round loaded it (a LoRA round always does);
    # never loaded just for this
    gen = ctx.__dict__.get("generator")
    about: dict[str, Any] = {
        "adapter": "lora",
        "weights": LORA_WEIGHTS,
        "load": "diffusers: pipeline.load_lora_weights(<this folder>) on the base "
        "generator; a bare UNet2DConditionModel: unet.load_lora_adapter(<this "
        f"folder>, weight_name='{LORA_WEIGHTS}', prefix='unet'); this project's "
        "sampler: common.lora."
        "set_lora_state(unet, *common.lora.load_diffusers_lora(<this folder>))",
        "base_model": cfg.generator,
        "base_model_fingerprint": gen.fingerprint() if gen is not None else None,
        "conditioning": cfg.embedding,
        "text_encoder": cfg.text_encoder,
        "rank": rank,
        "lora_alpha": alpha,
        "scale": alpha / rank,
        # save_diffusers_lora folds alpha / rank into lora_B (metadata alpha = r)
        "scale_folded_into_lora_B": alpha != rank,
        "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in state}),
        "method": method_name,
        "dataset": cfg.dataset,
        "class_names": ctx.class_names,
        "training": {k: v for k, v in cfg.to_flat().items() if k.startswith("lora-")},
        "classifier": CLASSIFIER if has_classifier else None,
    }
    (path / "config.json").write_text(json.dumps(about, indent=2, default=str))


def _replace_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a new hidden folder beside ``final``, then rename it to
    ``final`` (the old one, if any, renamed away first and deleted)."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(_TMP + "*"):  # left by a crash in an earlier call
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f"{_TMP}tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mkdir honours the umask (tempfile.mkdtemp would make it 0700)
    old = parent / f"{_TMP}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    log(INFO, "Global model written to %s", final)
    return final
