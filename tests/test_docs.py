"""The README's figures are checked against the commands that print them: the demo block against the demo's saved
output (the mechanism, on a fixture: no demo run here; tests/test_demo.py checks it on a real demo's output), the
Kaggle plan tables against `make kaggle-plan`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ich_kaggle import cli, docs
from ich_kaggle.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
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


def _row(text: str, name: str) -> str:
    [row] = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    return row


def _figures(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d", text))


@pytest.mark.parametrize("name", ["seresnext50_512", "seresnext_pair", "kaggle_week"])
def test_the_kaggle_plans_in_the_readme_and_docs_are_what_kaggle_plan_prints(name, tmp_path, monkeypatch):
    """The Kaggle plan tables (README, docs/kaggle.md) hold `make kaggle-plan`'s figures at the estimated rates."""
    from ich_kaggle.core import config, ensemble
    from ich_kaggle.kaggle import plan, rates

    monkeypatch.setenv(rates.RATES_ENV, str(tmp_path / "no_measured_rates.yaml"))
    cfg = config.load(name)
    members = ensemble.load_members(cfg) if cfg.is_ensemble else [cfg]
    made = plan.make_plan(cfg, members)
    assert not made.measured
    totals = [made.training_hours, *(k.hours for k in made.inference), made.total_hours]
    totals.append(made.total_hours / plan.WEEKLY_GPU_HOURS)
    printed = {f"{h:.1f}" for h in totals}
    readme = _row((ROOT / "README.md").read_text(), name)
    assert _figures(readme) == printed, readme
    # docs/kaggle.md also breaks training down per member: hours per fold, each member's subtotal, the rates
    per_member = {m.name: [f.hours for f in made.folds if f.member == m.name] for m in members}
    detail = {f"{h:.1f}" for hours in per_member.values() for h in (hours[0], sum(hours))}
    table = _row((ROOT / "docs" / "kaggle.md").read_text(), name)
    assert printed <= _figures(table) <= printed | detail, table
    for m in members:
        r = rates.rate(m.model.backbone, m.data.image_size)
        assert f"{r.train:.0f} / {r.infer:.0f}" in table
