"""List the experiments (:data:`experiments.registry.EXPERIMENTS`): presets per scale, table and figure, command.

    python -m experiments
"""

from __future__ import annotations

from .registry import EXPERIMENTS


def main() -> None:
    for e in EXPERIMENTS.values():
        per_scale = ", ".join(f"{s} {sum(p.scale == s for p in e.presets)}" for s in e.scales)
        made = (f"tables/{e.name}.md" + (f", figures/{e.table.figure.file}" if e.table.figure else "")
                if e.table else "its own report")
        print(f"{e.name:18s} presets: {per_scale:32s} -> {made}\n{'':18s} python -m experiments.{e.name} --help")


if __name__ == "__main__":
    main()
