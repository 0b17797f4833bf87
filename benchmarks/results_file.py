"""Keep one section per benchmark in benchmarks/RESULTS.md.

A section starts at its ``## `` heading and ends before the next ``## ``
heading or at the end of the file. Writing a section replaces the section with
the same heading and leaves every other section as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

FILE_HEADER = """\
# Benchmark results

Each section is written by the benchmark named in its heading
(`python -m benchmarks.NAME --write-results` from the repository root, as root)
and lists the machine it ran on.
"""


def add_output_arguments(parser: argparse.ArgumentParser, work_dir_contents: str) -> None:
    """Add the options every benchmark takes: --write-results, --results-file, --work-dir, --verbose."""
    parser.add_argument("--write-results", action="store_true",
                        help=f"write the report into {RESULTS_PATH.name}, replacing this benchmark's section")
    parser.add_argument("--results-file", type=Path, default=RESULTS_PATH, metavar="FILE",
                        help="results file for --write-results (default: benchmarks/RESULTS.md)")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp"), metavar="DIR",
                        help=f"parent of the temporary working directory for {work_dir_contents}, which "
                             "is removed at the end (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Write ``## heading`` followed by ``body`` into ``path``, replacing that section if present."""
    text = path.read_text(encoding="utf-8") if path.exists() else FILE_HEADER
    section = f"## {heading}\n\n{body.strip()}\n"
    path.write_text(_with_section(text, heading, section), encoding="utf-8")


def _with_section(text: str, heading: str, section: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == f"## {heading}"), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "".join(lines[:start])
    after = "".join(lines[end:])
    return before + section + ("\n" + after if after else "")
