"""``python -m bench <command>``: pretrain | accuracy | lora | synth | ablation | fleet |
poison | simulation | readme."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": "bench.pretrain.cli",
    "accuracy": "bench.accuracy.cli",
    "lora": "bench.lora.cli",
    "synth": "bench.synth.cli",
    "ablation": "bench.ablation",
    "fleet": "bench.fleet.cli",
    "poison": "bench.poison",
    "simulation": "bench.simulation",
    "readme": "bench.accuracy.headline",
}


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s command with the rest of ``argv``; 2 on an unknown one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
