"""The README's demo figures come from the demo: `make demo` saves the block it prints (demo.txt beside its run),
`make docs` writes that block into README.md between the markers, and `make docs-check` fails, in one line, where
the README's block and the saved output differ (CI can run it; the lead regenerates the block with `make docs`).

demo.txt is the printed block, preceded by one `# ` line naming the demo's settings: only the default `make demo`
(the synthetic competition, the `demo` ensemble, no overrides) may stand in the README.
"""

from __future__ import annotations

from pathlib import Path

from .core.errors import UserError
from .core.io import atomic_open

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- demo-output:begin (make docs writes this block) -->", "<!-- demo-output:end -->"
DEFAULT_SETTINGS = "data=synthetic config=demo set=[]"


def settings_line(data: str | None, config_name: str, overrides: list[str] | None) -> str:
    return f"data={'synthetic' if data is None else data} config={config_name} set=[{' '.join(overrides or [])}]"


def save_output(path: Path, lines: list[str], settings: str) -> Path:
    """What the demo printed, for `make docs` (written atomically: a killed demo leaves the previous one)."""
    with atomic_open(path) as f:
        f.write(f"# {settings}\n" + "".join(f"{line}\n" for line in lines))
    return path


def read_output(path: Path) -> list[str]:
    """The saved block of the default demo; one line naming the fix when there is none or it is another demo's."""
    if not path.is_file():
        raise UserError(f"no demo output at {path}; run `make demo` first (about 5 minutes on 2 CPUs)")
    head, *lines = path.read_text().splitlines()
    if head != f"# {DEFAULT_SETTINGS}":
        raise UserError(
            f"{path} was written by a demo with other settings ({head.lstrip('# ')}), not the default "
            f"`make demo` ({DEFAULT_SETTINGS}); rerun `make demo` without DATA_DIR/CONFIG/overrides"
        )
    return lines


def _block(readme: Path) -> tuple[list[str], int, int]:
    """The README's lines and the (first, last) line indices of the fenced block between the markers."""
    text = readme.read_text().splitlines()
    try:
        begin, end = text.index(BEGIN), text.index(END)
    except ValueError:
        raise UserError(f"{readme} has no demo block (the lines {BEGIN!r} and {END!r}); put them around it") from None
    if end < begin + 3 or not text[begin + 1].startswith("```") or text[end - 1] != "```":
        raise UserError(f"{readme}: the demo markers must enclose one ``` fenced block (lines {begin + 1}-{end + 1})")
    return text, begin + 2, end - 1


def check(readme: Path, output: Path) -> str | None:
    """None when the README's demo block is the saved output; otherwise one line: the first difference, the fix."""
    want = read_output(output)
    text, first, last = _block(readme)
    have = text[first:last]
    if have == want:
        return None
    i = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
    where = f"line {first + i + 1}"
    got = have[i] if i < len(have) else "(nothing)"
    new = want[i] if i < len(want) else "(nothing)"
    return (
        f"{readme}'s demo block differs from the last `make demo` output ({output}) at {where}: "
        f"{got!r} in the README, {new!r} printed; run `make docs` to write it in"
    )


def update(readme: Path, output: Path) -> bool:
    """Write the saved output into the README's demo block; True when the README changed."""
    want = read_output(output)
    text, first, last = _block(readme)
    if text[first:last] == want:
        return False
    with atomic_open(readme) as f:
        f.write("\n".join(text[:first] + want + text[last:]) + "\n")
    return True
