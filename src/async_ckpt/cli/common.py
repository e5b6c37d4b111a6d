"""What the ``async-ckpt`` subcommand modules share: ``CliError`` and plain-text output helpers.

``cli.main`` (the entry point) and the command modules (``state``, ``export``, ``bench``, ``ctl``)
import from here, never from each other, so the imports stay one-way (docs/design.md).
"""

from __future__ import annotations


class CliError(Exception):
    """An expected failure of a subcommand: its message goes to stderr and the exit code is 1."""


def table(header: list[str], rows: list[tuple]) -> None:
    """Print ``rows`` under ``header`` as left-aligned columns two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [tuple(header), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def human(n: float) -> str:
    """A byte count as ``12 B``, ``1.5 KiB`` ... ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
