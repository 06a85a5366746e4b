"""A small self-contained HTML page: sections of text, tables and images linked relatively (the folder can be
zipped or copied and still opens). No templates, no scripts, escaped text."""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.io import atomic_open

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; }
.muted { color: #777; font-size: 0.85em; } nav a { margin-right: 1em; }
"""


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")

    def text(self, text: str) -> "Section":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def note(self, text: str) -> "Section":
        """A visible 'skipped because ...' box: missing inputs are reported, not fatal."""
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')
        return self

    def table(self, frame: pd.DataFrame, caption: str | None = None, index: bool = True, digits: int = 4) -> "Section":
        if caption:
            self.parts.append(f"<p><b>{html.escape(caption)}</b></p>")
        shown = frame.reset_index() if index else frame.copy()  # a named index would add a second header row
        for col in shown.columns:
            if pd.api.types.is_float_dtype(shown[col]):
                shown[col] = [("-" if pd.isna(v) else f"{v:.{digits}f}") for v in shown[col]]
        self.parts.append(shown.to_html(index=False, escape=True, border=0, na_rep="-"))
        return self

    def image(self, path: Path, page_dir: Path, alt: str) -> "Section":
        rel = Path(os.path.relpath(path, page_dir)).as_posix()
        self.parts.append(f'<a href="{html.escape(rel)}"><img src="{html.escape(rel)}" alt="{html.escape(alt)}"></a>')
        return self


@dataclass
class Page:
    title: str
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        sec = Section(title)
        self.sections.append(sec)
        return sec

    def render(self) -> str:
        nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "\n".join(
            f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>\n' + "\n".join(s.parts) for s in self.sections
        )
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n"
            f'<p class="muted">written {stamp} by ich_kaggle report</p>\n<nav>{nav}</nav>\n{body}\n</body></html>\n'
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_open(path) as f:
            f.write(self.render())
        return path
