"""Where the command line's reports go and how they look: a report folder never written over another run's, and a
report as a printed table, its markdown and the JSON of every number."""

from __future__ import annotations

import json
from pathlib import Path


def table(rows: list[tuple[str, str]]) -> str:
    """Rows (name, value) as indented lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def report(out: Path, name: str, title: str, rows: list[tuple[str, str]], record: dict) -> None:
    """Print the table, and write it (markdown) with the JSON of every number to out/."""
    text = table(rows)
    print(title)
    print(text)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{name}.md").write_text(f"# {title}\n\n```\n{text}\n```\n")
    print(f"  wrote {out / (name + '.json')}, {out / (name + '.md')}, {out / (name + '.png')}")


class ReportExistsError(ValueError):
    """A report folder already holds another run's report."""


def report_dir(out: str | None, default: Path, marker: str, force: bool) -> Path:
    """Where a report goes, never over another run's: --out (refused if it holds `marker` unless --force), or
    `default`, numbered -2, -3, ... past folders that already hold a report."""
    if out is not None:
        path = Path(out)
        if (path / marker).exists() and not force:
            raise ReportExistsError(f"{path} already holds a report ({marker}); pass --force to replace it, or "
                                    f"another --out")
    else:
        path, k = default, 1
        while (path / marker).exists() and not force:
            k += 1
            path = default.with_name(f"{default.name}-{k}")
    path.mkdir(parents=True, exist_ok=True)
    return path
