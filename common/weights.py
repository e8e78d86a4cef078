"""Where foundation weights come from: ``"embedded"``, a local folder or a hub id.

Every role (text encoder, captioner, generator, decoder) is loaded with
``from_pretrained``: the embedded stack that ships inside this package takes the
very same code path as Stable Diffusion / CLIP / BLIP from the hub.

Embedded layout (``common/embedded/``)::

    clip/        CLIPModel (transformers) + tokenizer      -> text-encoder, captioner
    generator/   unet/ (UNet2DConditionModel), scheduler/, conditioning.json
    judge/       classifier trained on the public split   -> FID-proxy, sanity tests
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EMBEDDED = "embedded"
EMBEDDED_ENV = "ONESHOT_EMBEDDED_DIR"


def embedded_dir() -> Path:
    """Folder of the embedded stack.

    The Flower app bundle carries code only, so the weights are looked up in the
    *installed* package (every ``sys.path`` entry), not next to this file.
    """
    env = os.environ.get(EMBEDDED_ENV)
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parent / "embedded"]
    candidates += [Path(p) / "common" / "embedded" for p in sys.path if p]
    for c in candidates:
        if (c / "clip" / "model.safetensors").is_file():
            return c
    raise FileNotFoundError(
        "The embedded foundation stack (common/embedded/) was not found in any of: "
        + ", ".join(str(c) for c in candidates[:4])
        + ". Install the project (`pip install -e .`), rebuild it with "
        "`python -m bench pretrain`, or set ONESHOT_EMBEDDED_DIR."
    )


def resolve_model(name: str, role: str, component: str) -> str:
    """Map a role's value to something ``from_pretrained`` accepts."""
    if name == EMBEDDED:
        return str(embedded_dir() / component)
    return os.path.expanduser(name)


@functools.cache
def quiet_hub_logging() -> None:
    """Keep the round's log readable: no per-shard "Loading weights" bars.

    transformers and diffusers draw a progress bar for every checkpoint they
    load; a client loads several per message, which buried the round's steps.
    Errors and warnings still print.
    """
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def loads_weights(cls: Any) -> bool:
    """Whether ``cls.from_pretrained`` loads weights (a transformers or diffusers
    model, an auto-model class, a pipeline), so takes ``use_safetensors``;
    configs, tokenizers, processors and schedulers load none."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    kinds = (PreTrainedModel, _BaseAutoModelClass, ModelMixin, DiffusionPipeline)
    return isinstance(cls, type) and issubclass(cls, kinds)


def load_pretrained(cls: Any, name: str, role: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error that names the role and the fix.

    Weights load from safetensors only (``use_safetensors=True``): a pickled
    ``.bin`` checkpoint from the hub can run code as it loads; a folder that has
    only one is refused with the fix (``save_pretrained`` writes safetensors).
    """
    quiet_hub_logging()
    if loads_weights(cls):
        kwargs.setdefault("use_safetensors", True)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = Path(name)
        looked = (
            f"local folder {where.resolve()}"
            if where.exists() or name.startswith((".", "/", "~"))
            else f"the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
        )
        sub = f" (subfolder {kwargs['subfolder']!r})" if "subfolder" in kwargs else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"{role}={name!r}{sub}: could not load {cls.__name__} weights from "
            f"{looked}: {e.__class__.__name__}: {first}. This machine may have no "
            "access to the hub: download the model elsewhere "
            f"(`huggingface-cli download {name}`) and set {role} to its local folder, "
            f"or use {role}='embedded'."
        ) from e


# Read-only models a process loads once and shares: a Flower simulation worker
# (a Ray actor) answers many clients, an in-process round runs every client in
# one process, and an OSCAR client wants the same CLIP as its captioner and its
# text encoder. Keyed by what was asked (role kind, name, device, dtype) and what
# the folder holds, so a checkpoint rewritten in place loads again. The few last
# used are kept. ONESHOT_SHARE_MODELS=0 loads afresh every time.
SHARED_SIZE = 4
_SHARED: OrderedDict[tuple, Any] = OrderedDict()
_SHARED_LOCK = threading.Lock()


def folder_stamp(name: str) -> tuple | None:
    """What a local checkpoint folder holds: every file's path, size and
    modification time, two levels deep (a pipeline's subfolders); ``None`` for
    a name that is not a local folder (a hub id, read from the hub cache)."""
    root = Path(name)
    if not root.is_dir():
        return None
    stamp = []
    for base, dirs, files in os.walk(root):
        depth = len(Path(base).relative_to(root).parts)
        if depth >= 2:
            dirs.clear()
        dirs.sort()
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(base, f))
            except OSError:
                continue
            stamp.append((os.path.join(base, f), st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def shared(kind: str, name: str, key: tuple, load: Callable[[], T]) -> T:
    """``load()`` once per process for the same ``kind``, ``name``, ``key``
    (device, dtype, ...) and folder contents; later calls get the same object.

    What is shared is read-only by contract: the loaders freeze their models
    (``eval()``, no gradients); a caller that wants to train or move one works
    on a ``copy.deepcopy``. A load that raises is not kept."""
    if os.environ.get("ONESHOT_SHARE_MODELS", "1") == "0":
        return load()
    full = (kind, name, key, folder_stamp(name))
    with _SHARED_LOCK:
        if full in _SHARED:
            _SHARED.move_to_end(full)
            return _SHARED[full]
    obj = load()
    with _SHARED_LOCK:
        _SHARED[full] = obj
        while len(_SHARED) > SHARED_SIZE:
            _SHARED.popitem(last=False)
    return obj


def frozen(model: Any) -> Any:
    """``model`` in eval mode with no parameter requiring gradients (shared)."""
    model.eval()
    model.requires_grad_(False)
    return model
