"""report/index.html: one page that shows every figure a run produced, in sections.

Different stages of the pipeline (training, routing, federated rounds, export) add their own
sections at different times. `update_index` keeps the sections in report/sections.json, so a
stage replaces its own section (same key) without re-rendering anyone else's figures.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.errors import SdrEdgeError

SECTIONS_FILE = "sections.json"
INDEX_FILE = "index.html"


class ReportError(SdrEdgeError, ValueError):
    """A run dir or report file a report cannot be made from (one line for the user)."""


@dataclass
class Section:
    """A titled block of figures, with an optional paragraph and table.

    `images` are paths relative to the report folder (absolute paths inside it are made
    relative). `table` is a list of rows whose first row is the header. `key` identifies the
    section for replacement; it defaults to the title.
    """

    title: str
    images: list[str | Path] = field(default_factory=list)
    text: str | None = None
    table: list[list[str]] | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        self.key = self.key or self.title
        self.images = [str(p) for p in self.images]
        if self.table is not None:
            self.table = [[str(cell) for cell in row] for row in self.table]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ccc; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8rem; color: #666; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
"""


def _relative(report_dir: Path, image: str) -> str:
    """Image paths as the page links them: relative to the report folder."""
    path = Path(image)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(report_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"report image {path} is not inside {report_dir}") from None


def _anchor(section: Section) -> str:
    """An id attribute value without whitespace or markup characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", section.key or section.title).strip("-").lower()


def _render_section(report_dir: Path, section: Section) -> str:
    parts = [f"<section id=\"{_anchor(section)}\">",
             f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        parts.append(f"<p>{html.escape(section.text)}</p>")
    if section.table:
        header, *rows = section.table
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header)
                     + "</tr>")
        parts.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                     for row in rows)
        parts.append("</table>")
    for image in section.images:
        src = html.escape(_relative(report_dir, image), quote=True)
        parts.append(f"<figure><a href=\"{src}\"><img src=\"{src}\" alt=\"{src}\"></a>"
                     f"<figcaption>{src}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


def write_index(report_dir: str | Path, sections: list[Section],
                title: str = "sdr-edge run report") -> Path:
    """Write report_dir/index.html showing `sections` in order."""
    report_dir = Path(report_dir)
    for section in sections:
        section.images = [_relative(report_dir, p) for p in section.images]
    toc = " · ".join(f"<a href=\"#{_anchor(s)}\">{html.escape(s.title)}</a>" for s in sections)
    body = f"<nav>{toc}</nav>\n" + "\n".join(_render_section(report_dir, s) for s in sections)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return atomic_write_text(report_dir / INDEX_FILE, page)


def read_sections(report_dir: str | Path) -> list[Section]:
    """The sections recorded so far in report/sections.json (empty when there is none)."""
    path = Path(report_dir) / SECTIONS_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [Section(**entry) for entry in raw]
    except (json.JSONDecodeError, TypeError) as exc:
        raise ReportError(f"{path}: not a list of report sections ({exc})") from exc


def update_index(report_dir: str | Path, sections: list[Section],
                 title: str = "sdr-edge run report") -> Path:
    """Replace (by key) or append `sections`, keep everyone else's, and rewrite index.html."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    merged = read_sections(report_dir)
    for section in sections:
        section.images = [_relative(report_dir, p) for p in section.images]
        keys = [s.key for s in merged]
        if section.key in keys:
            merged[keys.index(section.key)] = section
        else:
            merged.append(section)
    atomic_write_text(report_dir / SECTIONS_FILE,
                      json.dumps([asdict(s) for s in merged], indent=2) + "\n")
    return write_index(report_dir, merged, title)
