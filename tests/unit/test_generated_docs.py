"""pyproject's config table and README's tables are generated from the registry.

``python -m methods docs`` writes them (``methods/docs.py``); these tests fail when
either drifted, when a key lacks its help text, when a registered method lacks its
card or README, and show that a new method folder is picked up with no other edit.
"""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path
from typing import Literal

import pytest
import tomllib
from pydantic import Field

from common.config import KeysModel
from methods import METHODS, build_config, config_keys, costs, docs
from methods.card import load_card

ROOT = Path(__file__).resolve().parents[2]


def _app_config(text: str) -> dict:
    return tomllib.loads(text)["tool"]["flwr"]["app"]["config"]


def _block(text: str, name: str) -> str:
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    return text.split(begin, 1)[1].split(end, 1)[0]


def _first_cells(block: str) -> list[str]:
    return [
        ln.split("|")[1].strip()
        for ln in block.splitlines()
        if ln.startswith("| ") and not ln.startswith(("| key |", "| method |"))
    ]


def test_pyproject_and_readme_match_the_registry():
    problems = docs.drift()
    assert not problems, "\n".join(problems)


def test_every_key_has_a_description_every_method_a_card_and_a_readme():
    problems = docs.warnings()
    assert not problems, "\n".join(problems)


def test_pyproject_defaults_are_the_models_with_their_types():
    table = _app_config((ROOT / "pyproject.toml").read_text())
    assert list(table) == [k.name for g in docs.key_groups() for k in g.keys]
    for g in docs.key_groups():
        for k in g.keys:
            # a float stays a float (600.0, not 600), as Flower passes it on
            assert type(table[k.name]) is type(k.default), k.name
            assert table[k.name] == k.default, k.name
    cfg = build_config(table)
    assert cfg.to_flat() == table


def test_readme_names_every_registered_method_and_every_key():
    text = (ROOT / "README.md").read_text()
    rows = _first_cells(_block(text, docs.METHOD_TABLE))
    names = [re.fullmatch(r"\[`(.+)`\]\((.+)\)", r) for r in rows]
    assert all(names), rows
    assert [m.group(1) for m in names if m] == list(METHODS)
    for m in names:
        assert m and (ROOT / m.group(2)).is_file(), m
    keys = [c.strip("`") for c in _first_cells(_block(text, docs.CONFIG_KEYS))]
    assert sorted(keys) == config_keys()
    method_row = next(
        ln for ln in _block(text, docs.CONFIG_KEYS).splitlines() if "| `method` |" in ln
    )
    assert all(name in method_row for name in METHODS)


# Same name, another quantity: the shared `learning-rate` is the classifier's.
NOT_REPEATS = {
    "lora-learning-rate": "the clients' LoRA adapter fine-tuning",
    "feddeo-learning-rate": "the clients' optimisation of the descriptions",
}


def test_a_method_key_does_not_repeat_a_shared_key():
    shared = {k.name for k in docs.key_groups()[0].keys}
    for g in docs.key_groups()[1:]:
        for k in g.keys:
            stem = k.name.removeprefix(f"{g.title}-")
            assert stem not in shared or k.name in NOT_REPEATS, (
                f"{k.name} repeats the shared key {stem!r}: read ctx.cfg's instead"
            )


@pytest.mark.parametrize(
    "value,literal",
    [
        (True, "true"),
        (0, "0"),
        (600.0, "600.0"),
        (0.002, "0.002"),
        (1e-5, "1e-5"),
        (1e-4, "0.0001"),
        ('a"b', '"a\\"b"'),
    ],
)
def test_toml_values_keep_their_type(value, literal):
    assert docs.toml_value(value) == literal
    assert tomllib.loads(f"x = {literal}")["x"] == value
    assert type(tomllib.loads(f"x = {literal}")["x"]) is type(value)


class _Ranges(KeysModel):
    a: float = Field(0.5, gt=0, le=1, description="a")
    b: int = Field(2, ge=1, le=10, description="b")
    c: float = Field(0.1, ge=0, description="c")
    d: Literal["x", "y"] = Field("x", description="d")
    e: str = Field("", description="e", json_schema_extra={"allowed": "a path"})
    f: bool = Field(False, description="f")


@pytest.mark.parametrize(
    "field,shown",
    [
        ("a", "(0, 1]"),
        ("b", "1..10"),
        ("c", ">= 0"),
        ("d", "x, y"),
        ("e", "a path"),
        ("f", "bool"),
    ],
)
def test_allowed_column_is_derived_from_the_field(field, shown):
    assert docs.allowed(field, _Ranges.model_fields[field]) == shown


def _repo_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in (
        "pyproject.toml",
        "README.md",
        costs.ACCURACY_RESULTS,
        costs.LORA_RESULTS,
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    return root


def test_check_names_what_drifted_and_exits_nonzero(tmp_path, capsys):
    root = _repo_copy(tmp_path)
    py = root / "pyproject.toml"
    py.write_text(py.read_text().replace("lora-rank = 4\n", "lora-rank = 5\n"))
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("| `lora-rank` | `4` |", "| x |"))
    assert docs.main(["--check"], root=root) == 1
    err = capsys.readouterr().err
    assert "pyproject.toml drifted" in err and "lora-rank = 4" in err
    assert "README.md drifted" in err
    assert docs.main([], root=root) == 0  # regenerates both
    assert docs.main(["--check"], root=root) == 0
    assert py.read_text() == (ROOT / "pyproject.toml").read_text()


def test_only_the_config_block_of_pyproject_is_rewritten():
    text = (ROOT / "pyproject.toml").read_text()
    # a stale value and a key no model declares go; the next table's comment stays
    edited = text.replace('method = "oscar"', 'method = "x"\nstale-key = 1').replace(
        "\n[tool.ruff]\n", "\n# ruff's settings\n[tool.ruff]\n"
    )
    new = docs.splice_pyproject(edited, docs.key_groups())
    assert new == text.replace("\n[tool.ruff]\n", "\n# ruff's settings\n[tool.ruff]\n")


_CARD = (
    'paper = "P"\npaper_url = ""\nfamily = "feature-based"\nuploads = "u"\n'
    'privacy = "features"\nsummary = "s"\n'
)

NEW_METHOD = {
    "__init__.py": """
from .server_newm import NewM

__all__ = ["NewM"]
""",
    "card.toml": """
paper = "Doe et al., NewM, 2099"
paper_url = "https://example.org/newm"
family = "feature-based"
uploads = "one vector per class"
privacy = "features"
summary = "samples from the vectors"
""",
    "config_newm.py": """
from pydantic import Field

from common.config import KeysModel


class NewMConfig(KeysModel):
    newm_strength: float = Field(2.0, gt=0)
    '''how hard
    it pushes'''
""",
    "server_newm.py": """
from methods.base import OneShotMethod

from .config_newm import NewMConfig


class NewM(OneShotMethod, config=NewMConfig):
    '''named by its folder'''
""",
    "README.md": "# NewM\n",
}


def test_a_new_method_folder_and_registry_line_are_picked_up(tmp_path, monkeypatch):
    folder = tmp_path / "extra_methods" / "newm"
    folder.mkdir(parents=True)
    (folder.parent / "__init__.py").write_text("")
    for name, text in NEW_METHOD.items():
        (folder / name).write_text(text.lstrip())
    monkeypatch.syspath_prepend(str(tmp_path))
    new_method = importlib.import_module("extra_methods.newm").NewM
    monkeypatch.setitem(METHODS, "newm", new_method)  # the one registry line

    root = _repo_copy(tmp_path)
    assert any("drifted" in p for p in docs.drift(root))
    assert docs.main([], root=root) == 0
    table = _app_config((root / "pyproject.toml").read_text())
    assert table["newm-strength"] == 2.0
    assert build_config(table | {"method": "newm"}).method == "newm"
    readme = (root / "README.md").read_text()
    assert "extra_methods/newm/README.md) | feature-based |" in readme
    assert "| `newm-strength` | `2.0` | > 0 | how hard it pushes |" in readme
    assert "newm" in next(ln for ln in readme.splitlines() if "| `method` |" in ln)
    # it uploads nothing: the privacy-guard table runs it as it is
    envelope = next(
        ln for ln in readme.splitlines() if ln.startswith("| runs as it is")
    )
    assert envelope.endswith("`zero-shot`, `newm` |")
    assert not [w for w in docs.warnings(root) if "newm" in w]


class _Documented(KeysModel):
    plain: int = Field(1)
    """the help text,
    over two lines"""
    explicit: int = Field(2, description="an explicit description")
    """a docstring that the explicit description wins over"""


def test_a_keys_docstring_is_its_one_line_description():
    """The docstring under a field is its help text (pydantic's attribute
    docstrings), joined into one line for the tables; ``description=`` still wins."""
    fields = _Documented.model_fields
    assert fields["plain"].description == "the help text, over two lines"
    assert fields["explicit"].description == "an explicit description"


def test_method_table_quotes_the_measured_costs_of_the_bench_results(tmp_path):
    """Upload is the mean, client cost the median over the committed bench's
    runs, checked by hand: oscar (4,000 + 5,000 + 6,000) / 3 = 5.0 KB and the
    median of 1, 2 and 9 ms per image is 2 ms (a run slowed by a shared CPU does
    not move it); a failed run is left out; class-names trains nothing; LoRA's
    records repeat one client fine-tune per merge variant, so it is per seed:
    (100,000 + 300,000) / 2 = 200 KB, median of 30 and 50 s = 40 s."""
    import json

    (tmp_path / "bench-results").mkdir()
    runs = [
        {
            "method": "oscar",
            "seed": 0,
            "ok": True,
            "upload_bytes_per_client": 4000.0,
            "client_s_per_image": 0.001,
        },
        {
            "method": "oscar",
            "seed": 1,
            "ok": True,
            "upload_bytes_per_client": 5000.0,
            "client_s_per_image": 0.002,
        },
        {
            "method": "oscar",
            "seed": 3,
            "ok": True,
            "upload_bytes_per_client": 6000.0,
            "client_s_per_image": 0.009,
        },
        {
            "method": "oscar",
            "seed": 2,
            "ok": False,
            "upload_bytes_per_client": 9e9,
            "client_s_per_image": 9.0,
        },
        {
            "method": "class-names",
            "seed": 0,
            "ok": True,
            "upload_bytes_per_client": 183.0,
            "client_s_per_image": None,
        },
    ]
    (tmp_path / costs.ACCURACY_RESULTS).write_text(json.dumps({"runs": runs}))
    records = [
        {"variant": v, "seed": seed, "upload_bytes_per_client": up, "client_train_s": s}
        for seed, up, s in ((0, 100000.0, 30.0), (1, 300000.0, 50.0))
        for v in ("none", "fedavg", "ties")
    ]
    (tmp_path / costs.LORA_RESULTS).write_text(json.dumps({"records": records}))
    measured = costs.measured_costs(tmp_path)
    assert measured["oscar"] == costs.Cost(5000.0, pytest.approx(0.002), "image", 3)
    assert measured["class-names"].client_s is None
    assert measured["lora"] == costs.Cost(200000.0, 40.0, "fine-tune", 2)
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.split("|")[4:6]]
        for r in docs.render_method_table(tmp_path)
        if r.startswith("| [`")
    }
    assert rows["[`oscar`](methods/oscar/README.md)"] == ["5.0 KB", "2.0 ms per image"]
    assert rows["[`class-names`](methods/class_names/README.md)"] == [
        "183 B",
        "none (no client training)",
    ]
    assert rows["[`lora`](methods/lora/README.md)"] == [
        "200.0 KB",
        "40 s per fine-tune",
    ]
    assert rows["[`fedld`](methods/fedld/README.md)"] == ["not benched", "not benched"]


def test_readme_method_table_has_measured_costs_for_every_method():
    """Issue 26: README's method table lists every method with its measured
    upload size and client cost (the committed bench results cover them all)."""
    block = _block((ROOT / "README.md").read_text(), "methods")
    missing = [
        ln.split("|")[1].strip()
        for ln in block.splitlines()
        if ln.startswith("| [`") and "not benched" in ln
    ]
    assert not missing, f"methods with no measured cost in README: {missing}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('paper = "P"\nfamily = "feature-based"', "missing"),
        ("paper = ", "not TOML"),
        (_CARD + 'colour = "red"', "unknown key(s) ['colour']"),
        (_CARD.replace('"features"', '"secret"'), "privacy='secret'"),
        (_CARD.replace('"feature-based"', "3"), "family = 3 must be a string"),
    ],
)
def test_a_bad_card_is_refused_naming_the_file_and_the_key(tmp_path, text, error):
    (tmp_path / "card.toml").write_text(text)
    with pytest.raises(ValueError) as e:
        load_card(tmp_path)
    assert error in str(e.value) and "card.toml" in str(e.value)


def test_every_registered_method_has_a_card_that_loads():
    for cls in METHODS.values():
        card = load_card(docs.method_folder(cls))
        assert card is not None and card.paper and card.summary, cls.name
