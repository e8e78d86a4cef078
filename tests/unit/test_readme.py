"""The README stays in step with the code: Quickstart and CI (its generated tables:
``tests/unit/test_generated_docs.py``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


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
