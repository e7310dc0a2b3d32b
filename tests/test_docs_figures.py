"""Figures in README.md and docs/*.md equal the benchmark results files they cite (reads markdown only).

The convention (stated in the header of benchmarks/RESULTS.md):

* README's headline table (`| benchmark | result |` under "## Benchmarks"): each row names its source, either an
  explicit `RESULTS_<name>.md` or a benchmark script in backticks (`megabyte_vs_bytelm.py --quick`), which stands
  for the one `benchmarks/RESULTS_*.md` file whose text names `benchmarks/<script>` (its command line).
* docs/*.md: figures quoted from a results file sit between `<!-- figures: benchmarks/RESULTS_<name>.md -->` and
  `<!-- end figures -->`.

Every number in such a row or block must equal a number of the cited file, to the digits shown: the file's
number rounded to as many decimals as the quote shows (3.308 may be quoted as 3.31, 3.3 or 3; 3.31 not as 3.310;
a tie such as 7.035 may go either way).
Thousands separators, percent signs and a trailing ``x`` are ignored; a magnitude suffix (``k``, ``M``, ``B``,
``G``) is part of the number (``966M`` must appear as ``966M``; ``1k`` does not stand for 1024). Numbers inside
identifiers (``bf16``, ``x86_64``) are not figures.
"""

from __future__ import annotations

import decimal
import os
import re
from decimal import Decimal

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# A number not glued to a word, a digit or a dot before it; thousands groups; decimals; a magnitude suffix that is
# not the start of a word (the M of "MiB" is not one).
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?([kKMBG](?![A-Za-z]))?")
_SOURCE_FILE = re.compile(r"RESULTS_\w+\.md")
_SCRIPT = re.compile(r"`(?:benchmarks/)?([\w-]+\.py)\b")
_FIGURE_BLOCK = re.compile(r"<!-- figures: (?:benchmarks/)?(RESULTS_\w+\.md) -->(.*?)(?:<!-- end figures -->|\Z)",
                           re.S)


def numbers(text: str) -> list[tuple[Decimal, int, str, str]]:
  """``(value, decimals shown, magnitude suffix, as written)`` for every number in ``text``."""
  text = re.sub(r"(?<=\d)x(?=\d)", " x ", text)  # shapes like 2x1024x4/2x128
  found = []
  for match in _NUMBER.finditer(text):
    whole, fraction, suffix = match.group(1).replace(",", ""), match.group(2) or "", match.group(3) or ""
    found.append((Decimal(f"{whole}.{fraction}" if fraction else whole), len(fraction), suffix, match.group(0)))
  return found


def _rounded(value: Decimal, decimals: int) -> set[Decimal]:
  quantum = Decimal(1).scaleb(-decimals)
  return {value.quantize(quantum, rounding=mode) for mode in (decimal.ROUND_HALF_UP, decimal.ROUND_HALF_DOWN)}


def matches(quoted: tuple[Decimal, int, str, str], source: list[tuple[Decimal, int, str, str]]) -> bool:
  """Whether a quoted number is one of ``source``'s numbers, shown to ``quoted``'s digits."""
  value, decimals, suffix, _ = quoted
  return any(s_suffix == suffix and s_decimals >= decimals and value in _rounded(s_value, decimals)
             for s_value, s_decimals, s_suffix, _ in source)


def results_files(results_dir: str) -> dict[str, str]:
  """``{file name: text}`` of every per-benchmark results file (the gathered RESULTS.md is a copy of them)."""
  return {name: open(os.path.join(results_dir, name), encoding="utf-8").read()
          for name in sorted(os.listdir(results_dir)) if _SOURCE_FILE.fullmatch(name)}


def row_sources(row: str, results: dict[str, str]) -> tuple[list[str], str | None]:
  """The results files a README row cites, or a problem saying why none can be told."""
  named = sorted(set(_SOURCE_FILE.findall(row)))
  if named:
    missing = [name for name in named if name not in results]
    return named, (f"cites {', '.join(missing)}, which is not in benchmarks/" if missing else None)
  scripts = sorted(set(_SCRIPT.findall(row)))
  if not scripts:
    return [], "names no source: add the script in backticks (`name.py`) or `RESULTS_<name>.md`"
  files = []
  for script in scripts:
    naming = [name for name, text in results.items() if re.search(rf"benchmarks/{re.escape(script)}", text)]
    if len(naming) != 1:
      where = ", ".join(naming) or "no results file"
      return [], f"script {script} is named by {where}: cite the file with an explicit `RESULTS_<name>.md`"
    files.append(naming[0])
  return sorted(set(files)), None


def headline_rows(readme: str) -> list[str]:
  """The data rows of the `| benchmark | result |` table in README's "## Benchmarks" section."""
  section = readme.split("\n## Benchmarks", 1)
  assert len(section) == 2, "README.md has no '## Benchmarks' section"
  lines = section[1].split("\n## ", 1)[0].splitlines()
  start = next((i for i, line in enumerate(lines) if re.match(r"\|\s*benchmark\s*\|\s*result\s*\|", line)), None)
  assert start is not None, "README.md's Benchmarks section has no '| benchmark | result |' table"
  rows = []
  for line in lines[start + 2:]:  # past the header and its |---| line
    if not line.startswith("|"):
      break
    rows.append(line)
  return rows


def unmatched(text: str, sources: list[str], results: dict[str, str]) -> list[str]:
  source_numbers = [number for name in sources for number in numbers(results[name])]
  return [written for *_, written in (n for n in numbers(text) if not matches(n, source_numbers))]


def check_readme(readme: str, results: dict[str, str]) -> list[str]:
  """One line per headline row that cites no results file or quotes a number its file does not hold."""
  problems = []
  for row in headline_rows(readme):
    label = row.split("|")[1].strip()[:70]
    sources, problem = row_sources(row, results)
    if problem:
      problems.append(f"README row '{label}': {problem}")
      continue
    missing = unmatched(row, sources, results)
    if missing:
      problems.append(f"README row '{label}': {missing} not in {', '.join(sources)}")
  return problems


def check_doc(name: str, text: str, results: dict[str, str]) -> tuple[int, list[str]]:
  """``(figure blocks checked, problems)`` for one markdown file's `<!-- figures: ... -->` blocks."""
  problems, blocks = [], 0
  for match in _FIGURE_BLOCK.finditer(text):
    blocks += 1
    source, block = match.group(1), match.group(2)
    if not match.group(0).rstrip().endswith("<!-- end figures -->"):
      problems.append(f"{name}: figures block citing {source} has no '<!-- end figures -->'")
    elif source not in results:
      problems.append(f"{name}: figures block cites {source}, which is not in benchmarks/")
    else:
      missing = unmatched(block, [source], results)
      if missing:
        problems.append(f"{name}: figures {missing} not in {source}")
  return blocks, problems


def _read(*path) -> str:
  return open(os.path.join(ROOT, *path), encoding="utf-8").read()


# --- The repository's own files ------------------------------------------------------------------------------

def test_readme_headline_rows_equal_their_results_files():
  results = results_files(BENCHMARKS)
  assert len(headline_rows(_read("README.md"))) >= 5
  problems = check_readme(_read("README.md"), results)
  assert not problems, "\n".join(problems)


def test_docs_figure_blocks_equal_their_results_files():
  results = results_files(BENCHMARKS)
  total, problems = 0, []
  for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
    if name.endswith(".md"):
      blocks, found = check_doc(f"docs/{name}", _read("docs", name), results)
      total, problems = total + blocks, problems + found
  assert total >= 1, "no <!-- figures: ... --> block in docs/*.md: is the marker spelled as the convention says?"
  assert not problems, "\n".join(problems)


def test_a_changed_readme_figure_is_caught():
  """Each headline row, with one of its figures changed to a value its results file holds nowhere (judged by plain
  distance, independently of the matcher's rounding), is reported."""
  results = results_files(BENCHMARKS)
  readme = _read("README.md")
  for row in headline_rows(readme):
    sources, _ = row_sources(row, results)
    held = [float(v) for name in sources for v in re.findall(r"\d+(?:\.\d+)?", results[name].replace(",", ""))]
    result_cell = row.rsplit("|", 2)[1]
    tried = False
    for value, decimals, suffix, written in numbers(result_cell):
      changed = value * Decimal("1.37") + Decimal(1).scaleb(-decimals)
      changed = changed.quantize(Decimal(1).scaleb(-decimals))
      if any(abs(h - float(changed)) <= 0.5 * 10.0 ** -decimals for h in held):
        continue  # the changed value is a figure of the file after all; try the next one
      new_cell = result_cell.replace(written, f"{changed}{suffix}", 1)
      problems = check_readme(readme.replace(row, row.replace(result_cell, new_cell)), results)
      assert f"'{changed}{suffix}'" in "\n".join(problems), (row, written, changed, problems)
      tried = True
      break
    assert tried, f"no figure of row {row[:60]!r} could be changed to a value absent from {sources}"


# --- The checker on made-up files (expected outcomes written by hand) ----------------------------------------

RESULTS_A = """# A
Written by `benchmarks/alpha.py`. Ratio 10.99x, bpb 3.308 and 7.035; 1,510 bytes/s; MFU 39.0%; 966M params;
shape 2x1024x4/2x128 bf16; jax 0.12.0.1.
"""
RESULTS_B = "# B\nWritten by `benchmarks/beta.py` (`alpha.py` mentioned in passing). Figure 4.5.\n"


def readme_with(*rows: str) -> str:
  return "# x\n\n## Benchmarks\n\nText.\n\n| benchmark | result |\n|---|---|\n" + "\n".join(rows) + "\n\n## License\n"


@pytest.fixture
def made_up():
  return {"RESULTS_a.md": RESULTS_A, "RESULTS_b.md": RESULTS_B}


def test_numbers_normalise_separators_percent_and_x():
  got = [(str(v), d, s) for v, d, s, _ in numbers("1,510 vs 39.0% and 3.48x; 966M; 2x1024 bf16 x86_64 MiB 1.02 MiB")]
  assert got == [("1510", 0, ""), ("39.0", 1, ""), ("3.48", 2, ""), ("966", 0, "M"), ("2", 0, ""),
                 ("1024", 0, ""), ("1.02", 2, "")]


@pytest.mark.parametrize("quote, ok", [
    ("10.99x", True), ("11.0x", True), ("11x", True), ("11.1x", False), ("10.990x", False),  # rounding only
    ("3.31", True), ("3.308", True), ("3.309", False), ("7.04", True), ("7.03", True),  # 7.035, a tie: either neighbour
    ("1,510", True), ("1510", True), ("1,511", False),
    ("39.0%", True), ("39%", True), ("39.1%", False),
    ("966M", True), ("966", False), ("0.97B", False),  # a magnitude suffix must be the file's
])
def test_rounding_rule(made_up, quote, ok):
  row = f"| thing (`alpha.py --quick`) | {quote} |"
  assert (check_readme(readme_with(row), made_up) == []) is ok


def test_rows_name_their_source(made_up):
  assert check_readme(readme_with("| thing (`beta.py`) | 4.5 |"), made_up) == []
  assert check_readme(readme_with("| thing, `RESULTS_b.md` | 4.5 |"), made_up) == []
  assert check_readme(readme_with("| thing, `RESULTS_a.md` | 4.5 |"), made_up)  # 4.5 is B's figure, not A's
  assert "named by RESULTS_a.md, RESULTS_b.md" in check_readme(readme_with("| x (`alpha.py`) | 1 |"),
                                                                {**made_up, "RESULTS_b.md": RESULTS_A})[0]
  assert "names no source" in check_readme(readme_with("| thing | 4.5 |"), made_up)[0]
  assert "no results file" in check_readme(readme_with("| thing (`gamma.py`) | 4.5 |"), made_up)[0]
  assert "RESULTS_c.md, which is not" in check_readme(readme_with("| thing `RESULTS_c.md` | 4.5 |"), made_up)[0]
  # Configuration numbers in the label count too: they must be the run's.
  assert check_readme(readme_with("| shape 2x1024x4/2x128 bf16 (`alpha.py`) | 10.99x |"), made_up) == []
  assert check_readme(readme_with("| shape 2x2048x4/2x128 (`alpha.py`) | 10.99x |"), made_up)


def test_doc_figure_blocks(made_up):
  good = "Intro 123.\n\n<!-- figures: benchmarks/RESULTS_a.md -->\n* 10.99x and 3.31\n<!-- end figures -->\n\n99.9"
  assert check_doc("d.md", good, made_up) == (1, [])  # numbers outside the block are not checked
  assert check_doc("d.md", good.replace("3.31", "3.32"), made_up)[1]
  assert "no '<!-- end figures -->'" in check_doc("d.md", good.replace("<!-- end figures -->", ""), made_up)[1][0]
  assert "not in benchmarks/" in check_doc("d.md", good.replace("RESULTS_a", "RESULTS_z"), made_up)[1][0]
