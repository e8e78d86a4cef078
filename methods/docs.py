"""``python -m methods docs``: pyproject's config table and README's tables, generated.

The config models are the source of every run-config key, its default, its range
and its help text (``key: T = Field(default, ...)`` with the help as the docstring
under it): ``RunConfig`` in ``common/config.py`` for the shared keys,
``methods/<name>/config_<name>.py`` for a method's own. Each method's folder holds its card (``methods/<name>/card.toml``:
paper, family, upload, privacy class). From these
and the registry (``methods.METHODS``) this module writes:

1. ``[tool.flwr.app.config]`` of ``pyproject.toml``: the shared keys, then one
   commented group per method. Every key must be there: ``flwr run --run-config``
   refuses a key the table lacks (``flwr.common.config.fuse_dicts``), and Flower
   passes the values with their TOML types, so floats stay floats. A key in the
   table that no model declares is dropped, with a warning: ``build_config``
   would refuse it in every run (Flower itself needs no key there);
2. README.md's config-key table, method table and privacy-guard table, between
   the marker comments ``<!-- generated:config-keys -->`` …
   ``<!-- /generated:config-keys -->``, ``<!-- generated:methods -->`` …
   ``<!-- /generated:methods -->`` and ``<!-- generated:dp-guard -->`` …
   ``<!-- /generated:dp-guard -->``.

``python -m methods docs --check`` writes nothing, names what drifted and exits 1.
A method added to the registry is picked up with no edit here.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import tomllib
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from common.config import RunConfig

from .card import CARD_FILE, MethodCard, load_card
from .costs import (
    ACCURACY_RESULTS,
    LORA_METHOD,
    LORA_RESULTS,
    cost_cells,
    measured_costs,
)

ROOT = Path(__file__).resolve().parents[1]
TABLE = "[tool.flwr.app.config]"
CONFIG_KEYS = "config-keys"
METHOD_TABLE = "methods"
DP_TABLE = "dp-guard"
REGENERATE = "python -m methods docs"


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Key:
    """One run-config key as the docs show it."""

    name: str  # kebab-case, as in --run-config
    default: Any
    allowed: str
    description: str


@dataclass(frozen=True)
class Group:
    """The keys of one config model: the shared ones, or one method's own."""

    title: str  # "shared" or the method's registered name
    model: type[BaseModel]
    source: str  # the file that declares the model, relative to the repo root
    keys: tuple[Key, ...]


def _registry() -> dict[str, Any]:
    # Read at call time: the registry is methods.METHODS, whatever it holds now.
    from methods import METHODS

    return dict(METHODS)


def method_package(method: type) -> types.ModuleType:
    """The package of a method's folder (``methods/<name>/``)."""
    module = method.__module__
    return importlib.import_module(module.rpartition(".")[0] or module)


def method_folder(method: type) -> Path:
    """The folder of a method (``methods/<name>/``)."""
    return Path(method_package(method).__file__ or "").parent


def method_readme(method: type) -> str:
    """README's link to a method: its folder's README.md (the folder until then)."""
    folder = method_folder(method)
    readme = folder / "README.md"
    return _rel(readme if readme.is_file() else folder)


def method_card(method: type) -> MethodCard | None:
    """The card of the method's folder (``card.toml``); ``None`` if it has none."""
    return load_card(method_folder(method))


def _source(model: type[BaseModel]) -> str:
    return _rel(Path(sys.modules[model.__module__].__file__ or ""))


def _rel(path: Path) -> str:
    """A path as README and pyproject name it: relative to the repository."""
    return Path(os.path.relpath(path.resolve(), ROOT)).as_posix()


def key_groups() -> list[Group]:
    """The shared keys, then each registered method's own (registry order; a
    model two methods share is listed once, under the first)."""
    methods = _registry()
    groups = [Group("shared", RunConfig, _source(RunConfig), _keys(RunConfig))]
    seen: set[type[BaseModel]] = {RunConfig}
    for name, method in methods.items():
        model = getattr(method, "config", None)
        if model is None or model in seen:
            continue
        seen.add(model)
        groups.append(Group(name, model, _source(model), _keys(model)))
    return groups


def _keys(model: type[BaseModel]) -> tuple[Key, ...]:
    keys = []
    for attr, field in model.model_fields.items():
        name = field.alias or attr
        if field.is_required():
            raise ValueError(
                f"{model.__name__}.{attr}: key {name!r} has no default; every key "
                "needs one (it goes to pyproject's [tool.flwr.app.config])"
            )
        keys.append(
            Key(name, field.default, allowed(name, field), field.description or "")
        )
    return tuple(keys)


# ---------------------------------------------------------------- values and ranges


def toml_value(value: Any) -> str:
    """A default as a TOML literal, of its own type (``0.5``, ``10``, ``"dpm"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"default {value!r} is not a finite number")
        text = repr(value)  # always has '.', 'e': a TOML float, never an int
        mantissa, e, exponent = text.partition("e")
        return mantissa + e + (str(int(exponent)) if e else "")
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise TypeError(f"default {value!r}: a key's default must be bool, int, float, str")


def _number(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _range(metadata: Sequence[Any], kind: type) -> str:
    lo: Any = None
    hi: Any = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    if lo is not None and hi is not None:
        if not lo_open and not hi_open:
            return f"{_number(lo)}..{_number(hi)}"
        return (
            f"{'(' if lo_open else '['}{_number(lo)}, "
            f"{_number(hi)}{')' if hi_open else ']'}"
        )
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_number(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_number(hi)}"
    return kind.__name__


def _allowed_type(annotation: Any, metadata: Sequence[Any]) -> list[str]:
    origin = get_origin(annotation)
    if origin is Literal:
        return [str(a) for a in get_args(annotation)]
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        meta = [m for e in extra for m in getattr(e, "metadata", [e])]
        return _allowed_type(inner, [*metadata, *meta])
    if origin in (Union, types.UnionType):
        # the named values first ("auto"), then the ranges
        ordered = sorted(
            get_args(annotation), key=lambda a: get_origin(a) is not Literal
        )
        return [v for a in ordered for v in _allowed_type(a, [])]
    if annotation is bool:
        return ["bool"]
    if annotation in (int, float):
        return [_range(metadata, annotation)]
    if annotation is str:
        short = any(isinstance(m, at.MinLen) and m.min_length > 0 for m in metadata)
        return ["non-empty text" if short else "text"]
    return [getattr(annotation, "__name__", str(annotation))]


def allowed(name: str, field: FieldInfo) -> str:
    """What a key accepts: ``json_schema_extra={"allowed": ...}`` where the type
    cannot say it, else derived from the type and its constraints."""
    if name == "method":
        return ", ".join(_registry())
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("allowed"), str):
        return str(extra["allowed"])
    return ", ".join(_allowed_type(field.annotation, field.metadata))


# ---------------------------------------------------------------- pyproject.toml


def render_toml_table(groups: list[Group]) -> list[str]:
    """The lines of pyproject's ``[tool.flwr.app.config]`` block: a header saying
    it is generated, the table line, then each group's keys with their defaults
    under a comment naming its config model."""
    lines = [
        f"# Generated by `{REGENERATE}` from the config models (each key's default,",
        "# range and help text live there): edit them, not this table. Every key must",
        "# be here: `flwr run --run-config` refuses a key this table lacks.",
        TABLE,
    ]
    for i, g in enumerate(groups):
        if i:
            lines.append("")
        who = "shared keys" if g.title == "shared" else g.title
        lines.append(f"# {who} ({g.source}: {g.model.__name__})")
        lines += [f"{k.name} = {toml_value(k.default)}" for k in g.keys]
    return lines


def unmodelled(text: str, groups: list[Group]) -> list[str]:
    """Keys of pyproject's table that no config model declares (the generated
    table drops them)."""
    table = tomllib.loads(text).get("tool", {}).get("flwr", {}).get("app", {})
    known = {k.name for g in groups for k in g.keys}
    return [
        k
        for k, v in table.get("config", {}).items()
        if k not in known and not isinstance(v, dict)  # a sub-table is its own block
    ]


def splice_pyproject(text: str, groups: list[Group]) -> str:
    """``text`` with its ``[tool.flwr.app.config]`` block (and the comment lines
    right above it) replaced by the generated one; everything else untouched."""
    lines = text.splitlines()
    if TABLE not in lines:
        raise ValueError(f"pyproject.toml has no {TABLE} table; add the header line")
    start = lines.index(TABLE)
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    end = lines.index(TABLE) + 1
    while end < len(lines) and not lines[end].startswith("["):
        end += 1
    # comment lines after the block's last blank line introduce the next table
    tail = end
    while tail > start and lines[tail - 1].startswith("#"):
        tail -= 1
    if tail == start or lines[tail - 1].strip():
        tail = end
    new = render_toml_table(groups)
    out = lines[:start] + new + ([""] if end < len(lines) else []) + lines[tail:end]
    out += lines[end:]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- README.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_config_table(groups: list[Group]) -> list[str]:
    """README's config-key tables: one per group (the shared keys, then each
    method's, linked to its README) with default, allowed values and meaning; then
    the methods with no keys of their own."""
    head = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    out: list[str] = []
    methods = _registry()
    for g in groups:
        if g.title == "shared":
            out += [f"Shared keys (`{g.source}`: `{g.model.__name__}`):", ""]
        else:
            readme = method_readme(methods[g.title])
            out += [
                f"[`{g.title}`]({readme}) (`{g.source}`: `{g.model.__name__}`):",
                "",
            ]
        out += head
        out += [
            f"| `{k.name}` | `{toml_value(k.default)}` | {_cell(k.allowed)} | "
            f"{_cell(k.description)} |"
            for k in g.keys
        ]
        out.append("")
    keyless = [n for n, m in methods.items() if getattr(m, "config", None) is None]
    if keyless:
        out.append(
            "No keys of their own: " + ", ".join(f"`{n}`" for n in keyless) + "."
        )
    else:
        out.pop()
    return out


def _link(text: str, url: str) -> str:
    return f"[{_cell(text)}]({url})" if url else _cell(text)


def render_method_table(root: Path = ROOT) -> list[str]:
    """README's method table: one row per registered method from its card and
    its measured costs (``measured_costs``); a method without a card gets a row
    saying so."""
    costs = measured_costs(root)
    out = [
        "| method | family | what a client uploads | upload per client | "
        "client cost | privacy class | paper | code | what the server does |",
        "|---|---|---|---:|---:|---|---|---|---|",
    ]
    for name, method in _registry().items():
        link = method_readme(method)
        card = method_card(method)
        upload, client = cost_cells(costs.get(name))
        if card is None:
            out.append(
                f"| [`{name}`]({link}) | ? | ? | {upload} | {client} | ? | ? | ? | "
                f"no card: write `{_rel(method_folder(method))}/{CARD_FILE}` |"
            )
            continue
        code = _link(card.code, f"https://github.com/{card.code}") if card.code else ""
        out.append(
            f"| [`{name}`]({link}) | {card.family} | {_cell(card.uploads)} | "
            f"{upload} | {client} | {card.privacy} | "
            f"{_link(card.paper, card.paper_url)} | {code} | {_cell(card.summary)} |"
        )
    out += [
        "",
        f"Upload per client and client cost are measured, not declared: the mean "
        "upload and the median client time over the runs of the committed quick "
        f"accuracy bench (`{ACCURACY_RESULTS}`: "
        "4 clients of at most 600 examples, 16-px images, the 2-core CPU it names) "
        f"and, for `{LORA_METHOD}`, of the LoRA bench (`{LORA_RESULTS}`). Client cost "
        "is the client's wall time over its training images (collection and local "
        "training); a method with no client training shows none. Rerunning a bench "
        f"and `{REGENERATE}` updates them.",
    ]
    return out


def render_dp_table() -> list[str]:
    """README's table of what ``dp-epsilon > 0`` does to each registered method:
    from each method's ``private_uploads`` (its client module's
    ``PRIVATE_UPLOADS``) and whether it uploads anything (``payload_key``)."""
    rows: dict[str, list[str]] = {
        "guarded: the whole upload is (epsilon, delta)-DP": [],
        "refused before any client works: no guard for its upload yet": [],
        'runs as it is: nothing goes up but the envelope (`"dp": null`)': [],
    }
    guarded, refused, envelope = rows.values()
    for name, method in _registry().items():
        if method.payload_key is None:
            envelope.append(name)
        else:
            (guarded if method.private_uploads else refused).append(name)
    out = ["| with `dp-epsilon > 0` | methods |", "|---|---|"]
    for what, names in rows.items():
        out.append(f"| {what} | {', '.join(f'`{n}`' for n in names) or 'none'} |")
    return out


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"


def splice_block(text: str, name: str, body: list[str]) -> str:
    """``text`` with the lines between the marker pair of ``name`` replaced."""
    begin, end = _markers(name)
    lines = text.splitlines()
    if begin not in lines or end not in lines:
        raise ValueError(
            f"README.md lacks the marker pair {begin} ... {end}: put both lines "
            "where the generated table goes"
        )
    i, j = lines.index(begin), lines.index(end)
    if j < i:
        raise ValueError(f"README.md: {end} comes before {begin}")
    note = f"<!-- generated by `{REGENERATE}`: edit the registry, not this block -->"
    return "\n".join(lines[: i + 1] + [note, "", *body, ""] + lines[j:]) + "\n"


def render_readme(text: str, root: Path = ROOT) -> str:
    """``text`` (README.md) with its config-key, privacy-guard and method tables regenerated
    between their markers (measured costs from the bench results under
    ``root``)."""
    text = splice_block(text, CONFIG_KEYS, render_config_table(key_groups()))
    text = splice_block(text, DP_TABLE, render_dp_table())
    return splice_block(text, METHOD_TABLE, render_method_table(root))


# ---------------------------------------------------------------- the command


def generate(root: Path = ROOT) -> dict[Path, str]:
    """The generated content of the files this module owns a part of, in the
    repository at ``root`` (paths they name are relative to this repository)."""
    py, readme = root / "pyproject.toml", root / "README.md"
    return {
        py: splice_pyproject(py.read_text(), key_groups()),
        readme: render_readme(readme.read_text(), root),
    }


def warnings(root: Path = ROOT) -> list[str]:
    """What a registered method still lacks (tests/unit/test_generated_docs.py fails on
    each): a description per key, a card, a README in its folder; and the keys
    of pyproject's table that no model declares (regenerating drops them)."""
    groups = key_groups()
    out = [
        f"pyproject.toml: key {k!r} is in no config model (build_config refuses it); "
        "the generated table drops it"
        for k in unmodelled((root / "pyproject.toml").read_text(), groups)
    ]
    for g in groups:
        out += [
            f"{g.source}: key {k.name!r} has no description (a docstring under "
            "its field)"
            for k in g.keys
            if not k.description.strip()
        ]
    for name, method in _registry().items():
        folder = _rel(method_folder(method))
        if method_card(method) is None:
            out.append(f"{name}: no {folder}/{CARD_FILE}")
        if not (method_folder(method) / "README.md").is_file():
            out.append(f"{name}: no {folder}/README.md")
    return out


def drift(root: Path = ROOT) -> list[str]:
    """One message per file whose generated part differs from the registry."""
    out = []
    for path, want in generate(root).items():
        have = path.read_text()
        if have == want:
            continue
        diff = list(
            difflib.unified_diff(
                have.splitlines(),
                want.splitlines(),
                "on disk",
                "generated",
                n=0,
                lineterm="",
            )
        )
        shown = "\n    ".join(diff[2:42]) + ("\n    ..." if len(diff) > 42 else "")
        out.append(
            f"{path.name} drifted from the registry (run `{REGENERATE}`):\n    {shown}"
        )
    return out


def main(argv: Sequence[str] | None = None, root: Path = ROOT) -> int:
    """``python -m methods docs [--check]``: print what the registry lacks, then
    write the generated parts of pyproject.toml and README.md under ``root``; with
    ``--check``, write nothing and return 1 if either drifted. Returns the exit
    status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=REGENERATE,
        description="Write pyproject's [tool.flwr.app.config] and README's config "
        "and method tables from the method registry.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and name what drifted",
    )
    args = parser.parse_args(argv)
    for w in warnings(root):
        print(f"warning: {w}", file=sys.stderr)
    if args.check:
        problems = drift(root)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print("pyproject.toml and README.md match the registry")
        return 1 if problems else 0
    for path, want in generate(root).items():
        if path.read_text() != want:
            path.write_text(want)
            print(f"wrote {path}")
        else:
            print(f"{path} is up to date")
    return 0
