"""Where a run's results go: ``output-dir`` made absolute, or refused.

Flower 1.41 does not tell the ServerApp which directory ``flwr run <dir>`` was
given. The CLI sends the app bundle (FAB: ``pyproject.toml`` and the
``fab-include`` files, with fixed timestamps, so identical checkouts give
byte-identical bundles) and the ``--run-config`` overrides; the ServerApp runs
the bundle's copy under ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>``
in the working directory of the SuperLink, and ``flwr run . local`` starts that
SuperLink once and reuses it for every later run, from any checkout.

A relative ``output-dir`` is therefore resolved as follows:

- ``source`` (the app's code runs from a source tree, e.g. the in-process
  harness): against that tree if it is a checkout (it has a ``pyproject.toml``),
  else against the working directory;
- ``simulation``: against the working directory of the simulation SuperLink,
  but only if that directory holds a checkout of this very app (the bundle
  ``flwr run`` would build there has this run's files); otherwise the run was
  submitted from another checkout, and it is refused;
- ``deployment``: refused; the ServerApp's working directory is the server's.

Two checkouts whose app files are identical cannot be told apart: such a run
lands in the SuperLink's checkout, and the log line names the absolute path.
An absolute ``output-dir`` is always used as given.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Literal

import tomllib
from flwr.common.logger import log

from common.config import ConfigError

Runtime = Literal["source", "simulation", "deployment"]

# flwr.common.config.get_project_dir: $FLWR_HOME/apps/<publisher>.<name>.<version>.<h>
INSTALLED_APP = re.compile(r"(?P<prefix>.+)\.(?P<hash>[0-9a-f]{8})")
# The command Flower's SuperExec starts for each simulated run
# (flwr.supercore.constant.TASK_TYPE_TO_COMMAND); a deployment's is flwr-serverapp.
SIMULATION_COMMAND = "flwr-simulation"
# Written into the installed bundle by Flower itself, not sent by `flwr run`: the
# lock file of its runtime dependency installation (`uv sync` in the app's folder,
# flwr.supercore.superexec.dependency_installer), unless the checkout bundles one.
RUNTIME_FILES = frozenset({"uv.lock"})
ABSOLUTE_EXAMPLE = "--run-config 'output-dir=\"/absolute/path/outputs\"'"
MAX_LISTED = 5


@dataclass(frozen=True)
class Where:
    """What this process can know about where the run came from.

    ``cwd`` is ``None`` when the working directory was deleted; ``app_root`` is
    the folder the app's code is imported from (an installed bundle, or a
    source tree).
    """

    runtime: Runtime
    cwd: Path | None
    app_root: Path


def app_root() -> Path:
    """The folder this app's code is imported from (``<root>/server_app/``)."""
    return Path(__file__).resolve().parents[1]


def is_installed_bundle(root: Path) -> bool:
    """Whether ``root`` is an app bundle that Flower installed for a run."""
    m = INSTALLED_APP.fullmatch(root.name)
    if m is None or root.parent.name != "apps":
        return False
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
        publisher = meta["tool"]["flwr"]["app"]["publisher"]
        name, version = meta["project"]["name"], meta["project"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(m["prefix"] == f"{publisher}.{name}.{version}")


def where() -> Where:
    """This process: the runtime it is in, its working directory, its app root."""
    root = app_root()
    runtime: Runtime
    if not is_installed_bundle(root):
        runtime = "source"
    elif Path(sys.argv[0]).name == SIMULATION_COMMAND:
        runtime = "simulation"
    else:
        runtime = "deployment"
    try:
        cwd: Path | None = Path.cwd().resolve()
    except FileNotFoundError:
        cwd = None
    return Where(runtime, cwd, root)


def bundle_differences(checkout: Path, app: Path) -> list[str]:
    """Files in which the bundle ``flwr run <checkout>`` would send differs from
    the installed bundle ``app`` (``pyproject.toml`` compared as TOML).

    Flower's own build decides which files a bundle holds; a file Flower writes
    into the installed bundle itself (``RUNTIME_FILES``) is no difference unless
    the checkout's bundle holds it too. Raises ``ValueError``
    (the reason) when ``checkout`` is not a Flower app.
    """
    from flwr.cli.build import build_fab_from_disk

    try:
        fab = build_fab_from_disk(checkout)
    except OSError as e:
        raise ValueError(f"{e.__class__.__name__}: {e}") from e
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        theirs = {n: z.read(n) for n in z.namelist() if not n.startswith(".info/")}
    ours = {
        p.relative_to(app).as_posix(): p.read_bytes()
        for p in app.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    for name in RUNTIME_FILES - theirs.keys():
        ours.pop(name, None)
    differ = []
    for name in sorted(theirs.keys() | ours.keys()):
        built, installed = theirs.get(name), ours.get(name)
        if name == "pyproject.toml" and built is not None and installed is not None:
            same = tomllib.loads(built.decode()) == tomllib.loads(installed.decode())
        else:
            same = built == installed
        if not same:
            differ.append(name)
    return differ


def _listed(names: list[str]) -> str:
    more = len(names) - MAX_LISTED
    return ", ".join(names[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def resolve_output_dir(output_dir: str, at: Where | None = None) -> Path:
    """``output-dir`` as an absolute path (see the module's docstring).

    Parameters
    ----------
    output_dir
        The run config's ``output-dir``.
    at
        Where this process runs; by default found out (:func:`where`).

    Raises
    ------
    ConfigError
        A relative ``output-dir`` where the project directory the run came from
        cannot be known; the message names the key, the value and the fix.
    """
    path = Path(output_dir).expanduser()
    if path.is_absolute():
        return path.resolve()
    at = at or where()
    head = f"output-dir={output_dir!r} is a relative path"
    fix = f"Pass an absolute output-dir: flwr run ... {ABSOLUTE_EXAMPLE}"

    # 1. A deployment: the working directory is the server's, never a checkout
    if at.runtime == "deployment":
        raise ConfigError(
            f"{head}, and this ServerApp runs in a deployment: Flower gives it the "
            "app bundle and the run config but not the directory `flwr run` was "
            "given, so the results would land in its working directory "
            f"{at.cwd} (where the SuperLink or flwr-serverapp was started). {fix}."
        )

    # 2. Code from a source tree: that tree is the project directory
    if at.runtime == "source":
        if (at.app_root / "pyproject.toml").is_file():
            base, why = at.app_root, "the checkout this app's code runs from"
        elif at.cwd is not None:
            base, why = at.cwd, "the working directory (the app is not a checkout)"
        else:
            raise ConfigError(f"{head}, and the working directory was deleted. {fix}.")
        return _resolved(output_dir, base / path, base, why)

    # 3. A simulation: the SuperLink's working directory, if it is this app's checkout
    stop = (
        "or stop the local SuperLink (python -m deploy.local_superlink stop) and "
        "run `flwr run . local` from your checkout, which starts a new one there"
    )
    if at.cwd is None:
        raise ConfigError(
            f"{head}, and the working directory of the simulation SuperLink was "
            f"deleted. {fix}, {stop}."
        )
    try:
        differ = bundle_differences(at.cwd, at.app_root)
    except ValueError as e:
        raise ConfigError(
            f"{head}, but the simulation SuperLink running this app was started "
            f"in {at.cwd}, which is not a checkout of this app ({e}). Flower does "
            "not tell the ServerApp which directory `flwr run` was given, so the "
            f"results would land in {at.cwd / path}. {fix}, {stop}."
        ) from None
    if differ:
        raise ConfigError(
            f"{head}, but this run's app differs from the checkout {at.cwd} that "
            f"the simulation SuperLink was started from ({len(differ)} file(s) "
            f"differ: {_listed(differ)}): the run was submitted from another "
            "checkout, and Flower does not tell the ServerApp which one; the "
            f"results would land in {at.cwd / path}. {fix}, {stop}."
        )
    return _resolved(
        output_dir,
        at.cwd / path,
        at.cwd,
        "the checkout the simulation SuperLink was started from, holding this run's app files",
    )


def _resolved(output_dir: str, path: Path, base: Path, why: str) -> Path:
    root = path.resolve()
    log(
        INFO,
        "output-dir %r is relative: resolved against %s (%s): %s",
        output_dir,
        base,
        why,
        root,
    )
    return root
