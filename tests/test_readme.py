"""The README stays in step with the code: config table, Quickstart, CI."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from methods import METHODS, build_config, config_keys

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _config_table() -> dict[str, str]:
    rows = {}
    in_table = False
    for line in README.splitlines():
        if line.startswith("| key | default |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-"}:
                continue
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def _toml_scalar(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def test_config_table_lists_every_key_with_the_pyproject_default():
    table = _config_table()
    keys = set(config_keys())
    assert set(table) == keys, (
        f"README lacks {sorted(keys - set(table))}, has extra {sorted(set(table) - keys)}"
    )
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]["config"]
    assert set(defaults) == keys
    for key, shown in table.items():
        assert shown == _toml_scalar(defaults[key]), (key, shown, defaults[key])
    # and pyproject's defaults are the models' defaults (shared and each method's)
    models = [build_config({}).__class__] + [
        m.config for m in METHODS.values() if m.config
    ]
    for model in models:
        for k, f in model.model_fields.items():
            assert f.default == defaults[f.alias or k], f.alias or k


def _quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_quickstart_is_two_commands_that_ci_runs():
    cmds = _quickstart_commands()
    assert len(cmds) == 2
    assert "pip install torch==2.13.0" in cmds[0] and "flwr run ." in cmds[0]
    assert "pytest" in cmds[1]
    ci = [
        ln
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip()
        and not ln.lstrip().startswith(
            ("#", "set ", "cd ", "export ", "trap ", "test ")
        )
    ]
    assert ci == cmds
