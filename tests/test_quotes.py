"""The write-up quotes its tables: a number in a marked span of README or RESULTS that its table no longer prints
is found, with its line; the committed write-up has none."""

from pathlib import Path

import pytest

from eval.quotes import QuoteError, main, spans, stale_numbers

ROOT = Path(__file__).resolve().parents[1]

TABLE = """# A table

UNet parameters: 1,045,729 and 4,170,177. EMA 0.9955 at 2,000 steps.

| metric | gap [95% CI] | p |
|---|---|---|
| fd_digits | +0.7436 [0.3651, 1.122] | 0.014 |
| confident_digits | -0.04467 [-0.06331, -0.02602] | 0.0093 |
| kid_digits | -0.009133 [n/a, n/a] | -80.2% |
"""


def write(tmp_path, prose: str) -> Path:
    (tmp_path / "tables").mkdir(exist_ok=True)
    (tmp_path / "tables" / "t.md").write_text(TABLE)
    doc = tmp_path / "DOC.md"
    doc.write_text(prose)
    return doc


def test_a_number_its_table_does_not_print_is_found_with_its_line(tmp_path):
    doc = write(tmp_path, "Intro 0.421 outside any span is not checked.\n"
                          "Here <!-- numbers from tables/t.md -->the gap is +0.74 [0.37, 1.12] (p = 0.014),\n"
                          "−0.045 [−0.063, −0.026] (p = 0.0093) at 4.17 M and 1.05 M parameters, EMA 0.9955, "
                          "−80.2% at 12,500 steps over 3 seeds;\n"
                          "stale: +0.75, 0.045 (sign dropped), 0.74 M, 1.044 M, 0.0094.<!-- /numbers -->\n")
    stale = stale_numbers(doc, root=tmp_path)
    assert [(s.line, s.number) for s in stale] == [(4, "+0.75"), (4, "0.045"), (4, "0.74 M"), (4, "1.044 M"),
                                                    (4, "0.0094")]
    assert str(stale[0]) == "DOC.md:4: +0.75 is in none of tables/t.md"


def test_a_half_way_number_may_round_either_way(tmp_path):
    """0.0125 may be quoted as 0.013 (half up) or 0.012 (half even), never 0.011."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| x |\n|---|\n| 0.0125 |\n")
    doc = tmp_path / "D.md"
    doc.write_text("Quoted <!-- numbers from tables/t.md -->0.013, 0.012 and 0.011<!-- /numbers -->")
    assert [s.number for s in stale_numbers(doc, root=tmp_path)] == ["0.011"]


@pytest.mark.parametrize("prose, message", [
    ("A <!-- numbers from tables/t.md -->+0.74", "never closed"),
    ("A <!-- numbers from tables/t.md -->+0.74<!-- numbers from tables/t.md --><!-- /numbers -->", "inside another"),
    ("+0.74<!-- /numbers -->", "closes no span"),
    ("A <!-- numbers from tables/gone.md -->+0.74<!-- /numbers -->", "tables/gone.md, which does not exist"),
    ("- A\n<!-- numbers from tables/t.md -->- B +0.74<!-- /numbers -->", "line 2: .* starts its line"),
    ("- <!-- numbers from tables/t.md -->B +0.74<!-- /numbers -->", "starts its line"),  # first in a list item
    ("A\n  > <!-- numbers from tables/t.md -->B +0.74<!-- /numbers -->", "starts its line"),  # first in a quote
    ("A <!-- number from tables/t.md -->0.99<!-- /numbers --> B <!-- numbers from tables/t.md -->+0.74"
     "<!-- /numbers -->", "line 1: a .* closes no span"),  # a mistyped opener ahead of a good span
])
def test_a_malformed_span_is_one_clear_error(tmp_path, prose, message):
    with pytest.raises(QuoteError, match=message):
        stale_numbers(write(tmp_path, prose), root=tmp_path)


def test_the_cli_exits_1_listing_each_stale_number(tmp_path, capsys):
    good = write(tmp_path, "Gap <!-- numbers from tables/t.md -->+0.74<!-- /numbers -->")
    assert main([str(good), "--root", str(tmp_path)]) == 0
    good.write_text("Gap <!-- numbers from tables/t.md -->+0.76<!-- /numbers -->")
    assert main([str(good), "--root", str(tmp_path)]) == 1
    assert "+0.76 is in none of tables/t.md" in capsys.readouterr().out


@pytest.mark.parametrize("doc", ["README.md", "RESULTS.md"])
def test_the_write_up_quotes_its_tables_as_they_stand(doc):
    """README's and RESULTS' summaries (the scaling paragraph, and the unconditional, backbone, inpainting, decoder,
    text-to-image and readings lines) are marked, and every number in them is printed by the tables they name."""
    marked = [tables for _, tables, _ in spans((ROOT / doc).read_text())]
    assert any("tables/scaling.md" in t for t in marked) and ("tables/unconditional.md",) in marked, marked
    assert len(marked) >= 5, marked
    assert [str(s) for s in stale_numbers(ROOT / doc, root=ROOT)] == []


def test_emphasis_ratios_millions_and_huge_numbers(tmp_path):
    """_0.99_ and 9.9x are numbers too; a table's own "1.05 M" is quoted as 1.05 M; a huge table number is no crash."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| x |\n|---|\n| 1.05 M params | 2.44x | 1e30 | 0.5 |\n")
    doc = tmp_path / "D.md"
    doc.write_text("Quoted <!-- numbers from tables/t.md -->1.05 M, 2.44×, _0.5_, _+0.99_, __0.98__, 9.9x"
                   "<!-- /numbers -->")
    assert [s.number for s in stale_numbers(doc, root=tmp_path)] == ["+0.99", "0.98", "9.9"]


def test_the_cli_says_a_malformed_span_in_one_line(tmp_path, capsys):
    doc = write(tmp_path, "A <!-- numbers from tables/t.md -->+0.74")
    with pytest.raises(SystemExit) as e:
        main([str(doc), "--root", str(tmp_path)])
    assert e.value.code == 2 and "never closed" in capsys.readouterr().err
