"""`make bench` on a fresh clone: without the real mini set it generates a synthetic competition, says so, and
prints figures, none of them "skipped" (one quick benchmark here; tests are never timed)."""

from __future__ import annotations

import re


from ich_kaggle import cli


def test_bench_without_the_real_mini_set_measures_synthetic_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # .cache/ of a fresh clone
    assert cli.main(["bench", "--mini", "synthetic", "--what", "meta"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("data: synthetic competition .cache/bench-synth")
    figures = [ln for ln in lines[1:] if not ln.startswith("==")]
    assert figures and all(re.fullmatch(r"[a-z0-9_]+: [0-9.]+.*", ln) for ln in figures), figures
    assert not any("skipped" in ln for ln in lines)


def test_an_unknown_benchmark_is_named(capsys):
    assert cli.main(["bench", "--what", "loadr"]) == 2
    assert "unknown benchmark loadr" in capsys.readouterr().err
