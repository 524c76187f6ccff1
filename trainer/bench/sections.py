"""bench/results.md is written by several benchmarks, each owning "## " sections of its own: a benchmark replaces its
section and leaves the others as they are."""
from __future__ import annotations

from pathlib import Path

# written by bench data, bench modern and bench qlora; bench speed keeps them
OWN_SECTIONS = ("Data path", "Modern families", "QLoRA: stored weights", "QLoRA: step", "QLoRA: quality")


def split(text: str) -> tuple[str, dict[str, str]]:
    """(the text before the first "## " section, title -> section text including its heading)."""
    parts = ("\n" + text).split("\n## ")
    head, sections = parts[0].lstrip("\n"), {}
    for part in parts[1:]:
        title = part.split("\n", 1)[0].strip()
        sections[title] = "## " + part.rstrip("\n") + "\n"
    return head, sections


def replace_section(path: Path, title: str, text: str) -> None:
    """`text` (starting with "## title") in place of that section of `path`, or at its end."""
    from trainer.atomic import write_text

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    head, sections = split(old)
    sections[title] = text.rstrip("\n") + "\n"
    write_text(path, head.rstrip("\n") + "\n\n" + "\n".join(sections.values()))


def kept_sections(path: Path) -> str:
    """The sections other benchmarks own, for bench speed, which rewrites the rest of the file."""
    if not path.exists():
        return ""
    _, sections = split(path.read_text(encoding="utf-8"))
    return "\n".join(v for k, v in sections.items() if k in OWN_SECTIONS)


def table(header: list[str], rows) -> list[str]:
    """A markdown table's lines: the header, its rule and one line a row (each cell as str() writes it)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
