"""The README's demo block is checked against the demo's saved output (the mechanism, on a fixture: no demo run
here; tests/test_demo.py checks it on a real demo's output)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ich_kaggle import cli, docs
from ich_kaggle.core.errors import UserError

PRINTED = ["prior_log_loss: 0.23740", "ensemble_log_loss: 0.20610", "submit_chose: stacked"]


def _readme(path: Path, block: list[str]) -> Path:
    path.write_text(
        "\n".join(["# project", "", "the demo prints", docs.BEGIN, "```", *block, "```", docs.END, "", "and more text"])
        + "\n"
    )
    return path


def test_a_stale_block_is_reported_in_one_line_and_make_docs_writes_it(tmp_path, capsys):
    output = docs.save_output(tmp_path / "demo.txt", PRINTED, docs.DEFAULT_SETTINGS)
    readme = _readme(
        tmp_path / "README.md", ["prior_log_loss: 0.23740", "ensemble_log_loss: 0.19881", "submit_chose: stacked"]
    )
    args = ["--readme", str(readme), "--demo-output", str(output)]
    assert cli.main(["docs-check", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "line 7" in err and "0.19881" in err and "0.20610" in err and "make docs" in err

    assert cli.main(["docs", *args]) == 0
    assert cli.main(["docs-check", *args]) == 0
    text = readme.read_text()
    assert "ensemble_log_loss: 0.20610" in text and "0.19881" not in text
    assert text.startswith("# project\n") and text.endswith("and more text\n")  # only the block changed
    assert docs.update(readme, output) is False  # already current


def test_missing_lines_and_markers_and_other_demos_are_named(tmp_path):
    output = docs.save_output(tmp_path / "demo.txt", PRINTED, docs.DEFAULT_SETTINGS)
    assert "(nothing)" in docs.check(_readme(tmp_path / "short.md", PRINTED[:2]), output)
    bare = tmp_path / "bare.md"
    bare.write_text("no block here\n")
    with pytest.raises(UserError, match="no demo block"):
        docs.check(bare, output)
    other = docs.save_output(tmp_path / "other.txt", PRINTED, docs.settings_line("data/x", "demo", ["cv.k=3"]))
    with pytest.raises(UserError, match="other settings.*data/x"):
        docs.check(_readme(tmp_path / "README.md", PRINTED), other)
    with pytest.raises(UserError, match="run `make demo` first"):
        docs.check(_readme(tmp_path / "README.md", PRINTED), tmp_path / "absent.txt")


@pytest.mark.slow
def test_the_readme_demo_block_is_what_make_demo_prints(tmp_path):
    """The figures of the README's quick start come from the default `make demo` (~2.5 minutes on 2 CPUs): run it
    as a user would, in a fresh folder, and check the block (a code change that moves a figure fails here until
    `make demo docs` writes the new block)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # as `make demo` runs: torch's own thread count (the suite pins one thread, which moves the figures)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(root), ICH_KAGGLE_MAKE="")
    proc = subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert docs.check(docs.README, tmp_path / "runs" / "demo" / "demo.txt") is None
