"""The Markdown report each script prints (and can write into docs/benchmarks.md with the machine and the
date)."""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ipt_engine.device import train_autocast_dtype

ROOT = Path(__file__).resolve().parents[1]

DOCS = ROOT / "docs" / "benchmarks.md"

# ---------------------------------------------------------------------------------------------- reports
def device_description(device: torch.device | str | None) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(dev)})"
    return f"CPU ({torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    native_bf16 = train_autocast_dtype("auto", torch.device("cpu"), torch.float32) is not None
    # what IST's default train precision ("auto") becomes on this CPU: a CPU without native bfloat16 trains in
    # float32, about half as fast
    parts = [f"{cpu_model()}, {os.cpu_count()} cores, {'native' if native_bf16 else 'no native'} bfloat16"]
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        parts.append(f"{memory:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        parts.append(", ".join(f"{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())))
    parts.append(f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
                 f"torch {torch.__version__}")
    return "; ".join(parts)


@dataclass
class Report:
    """A benchmark's result: a Markdown table with its context lines and notes, plus the figures by name
    (`values`) for whoever calls main() (the smoke tests)."""

    script: str
    title: str
    device_kind: str  # "cpu" or "cuda": docs keep one section per script and device kind
    context: list[str]
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def table(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.header)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True)) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in self.rows]
        return "\n".join([line, rule, *body])

    def markdown(self) -> str:
        parts = ["\n".join(f"- {c}" for c in self.context), self.table()]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def print(self) -> None:
        print(f"\n{self.title}\n\n{self.markdown()}\n", flush=True)


def finish(report: Report, args: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    """Print the report and, with --write-docs, write it into the docs file."""
    report.context.insert(0, f"machine: {machine_description()}")
    report.context.insert(1, f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    shown = list(sys.argv[1:] if argv is None else argv)
    report.context.insert(2, f"command: `.venv/bin/python -m benchmarks.{report.script} {' '.join(shown)}`".rstrip())
    report.print()
    if args.write_docs:
        path = Path(args.write_docs)
        if args.quick and path.resolve() == DOCS.resolve():
            raise SystemExit("--quick figures (a tiny random model) are not written into docs/benchmarks.md; "
                             "give --write-docs PATH to write them elsewhere")
        write_section(path, f"{report.script}:{report.device_kind}", f"{report.title} ({report.device_kind})",
                      report.markdown())
        print(f"written to {path}")
    return report


DOCS_HEADER = """# Benchmarks

Figures written by the scripts in `benchmarks/` (not by hand): each section says the machine, the date and the
command that produced it. Rerun a script with `--write-docs` to replace its section (one per script and device
kind). See `benchmarks/README.md` for what each script measures and how.
"""


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace the section marked `key` in the Markdown file at `path` (or append it)."""
    start, end = f"<!-- {key} start -->", f"<!-- {key} end -->"
    section = f"{start}\n## {title}\n\n{body}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else DOCS_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
