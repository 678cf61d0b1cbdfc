"""The write-up's numbers against the generated tables they quote, so that no sentence outlives its table.

    python -m eval.quotes                      # README.md and RESULTS.md; exit 1 listing each stale number
    python -m eval.quotes NOTES.md             # any markdown file

A span of prose opens with ``<!-- numbers from tables/a.md[, tables/b.md] -->`` and closes with
``<!-- /numbers -->`` (HTML comments: invisible when the markdown is rendered; the opening one goes inside a line,
after its first word, since a line that starts with ``<!--`` is an HTML block to CommonMark and GitHub, which would
print the rest of that line raw). Every decimal number inside
the span (``+0.74``, ``−0.045``, ``0.0093``, ``-20.0%``) must be a rounding of some number printed in the named
tables, at the number of decimals the prose gives it and with its sign; a number followed by `` M`` is read in
millions (``4.17 M`` quotes ``4,170,177``). Whole numbers (steps, seeds, minutes) are not checked, nor numbers
in scientific notation. The check finds a quoted number that no longer appears in its table (the table was
regenerated and the sentence was not); it does not check that the number is quoted for the right cell.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

from .records import ROOT

OPEN = re.compile(r"<!--\s*numbers from\s+(?P<tables>[^>]+?)\s*-->")
CLOSE = re.compile(r"<!--\s*/numbers\s*-->")
# a number not inside a word or another number: "+0.74", "−0.045", "1,045,729", "1.7e-06", "4.17 M"
TOKEN = r"[+\-−]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+\-]?\d+)?"
# a number may touch "_" (emphasis), "x" or "×" (a ratio) and "%", but not other letters or digits
NUMBER = re.compile(rf"(?<![A-Za-z0-9.])(?P<number>{TOKEN})(?P<millions>\s?M\b)?")
QUOTED = re.compile(rf"(?<![A-Za-z0-9.])(?P<number>{TOKEN})(?P<millions>\s?M\b)?(?![A-Za-wyz0-9]|\.\d)")
# what may precede an opening marker on its line for it to start an HTML block (rendered raw): up to 3 spaces, list
# item markers, block quote markers
BLOCK_START = re.compile(r"[ ]{0,3}(?:(?:[-+*]|\d+[.)]|>)[ ]*)*")


class QuoteError(ValueError):
    """A malformed span: unclosed, nested, or naming a table that does not exist."""


@dataclass(frozen=True)
class Stale:
    """A number quoted in ``file`` (line ``line``) that no number of ``tables`` rounds to."""

    file: str
    line: int
    number: str
    tables: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.number} is in none of {', '.join(self.tables)}"


def _decimal(token: str) -> Decimal:
    return Decimal(token.replace("−", "-").replace(",", ""))


def table_numbers(text: str) -> list[Decimal]:
    """Every number printed in a table file (its prose too: the EMA decays, the parameter counts); one printed in
    millions (``1.05 M``) is read as the count it stands for."""
    return [_decimal(m.group("number")).scaleb(6 if m.group("millions") else 0) for m in NUMBER.finditer(text)]


def rounds_to(quoted: str, numbers: list[Decimal], millions: bool = False) -> bool:
    """Whether some number of ``numbers`` (divided by 1e6 if ``millions``), rounded half-up or half-even to the
    decimals ``quoted`` gives, equals ``quoted``, sign included."""
    q = _decimal(quoted)
    step = Decimal(1).scaleb(q.as_tuple().exponent)
    for y in numbers:
        y = y.scaleb(-6) if millions else y
        try:
            if any(y.quantize(step, rounding=r) == q for r in (ROUND_HALF_UP, ROUND_HALF_EVEN)):
                return True
        except InvalidOperation:  # too large to round to these decimals: not this number
            continue
    return False


def spans(text: str) -> list[tuple[int, tuple[str, ...], str]]:
    """The marked spans of ``text``: (line of the opening marker, the tables named, the prose between)."""
    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    out, pos = [], 0
    while (m := OPEN.search(text, pos)) is not None:
        line = line_of(m.start())
        if stray := CLOSE.search(text, pos, m.start()):
            raise QuoteError(f"line {line_of(stray.start())}: a '<!-- /numbers -->' closes no span")
        end = CLOSE.search(text, m.end())
        if end is None:
            raise QuoteError(f"line {line}: '{m.group(0)}' is never closed by '<!-- /numbers -->'")
        if BLOCK_START.fullmatch(text, text.rfind("\n", 0, m.start()) + 1, m.start()):
            raise QuoteError(f"line {line}: '{m.group(0)}' starts its line, which makes the line an HTML block "
                             "(rendered raw): put it after the line's first word")
        body = text[m.end():end.start()]
        if OPEN.search(body):
            raise QuoteError(f"line {line}: a numbers span opens inside another")
        out.append((line, tuple(t.strip() for t in m.group("tables").split(",")), body))
        pos = end.end()
    if CLOSE.search(text, pos):
        raise QuoteError("a '<!-- /numbers -->' closes no span")
    return out


def stale_numbers(path: Path, root: Path = ROOT) -> list[Stale]:
    """The numbers in ``path``'s marked spans that their tables (paths relative to ``root``) do not print.

    Raises:
        QuoteError: a span is malformed or names a missing table.
    """
    text = path.read_text()
    found = []
    for line, tables, body in spans(text):
        numbers = []
        for table in tables:
            if not (root / table).is_file():
                raise QuoteError(f"{path.name}:{line}: the span quotes {table}, which does not exist")
            numbers += table_numbers((root / table).read_text())
        for m in QUOTED.finditer(body):
            number = m.group("number")
            if "." not in number or "e" in number.lower():
                continue
            if not rounds_to(number, numbers, millions=bool(m.group("millions"))):
                found.append(Stale(path.name, line + body.count("\n", 0, m.start()), number + (m.group("millions") or ""),
                                   tables))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, default=[ROOT / "README.md", ROOT / "RESULTS.md"])
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder the spans' table paths are relative to")
    args = parser.parse_args(argv)
    try:
        stale = [s for f in args.files for s in stale_numbers(f, args.root)]
    except (QuoteError, OSError) as e:
        parser.error(str(e))
    for s in stale:
        print(s)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
