"""Ensembles as experiments (issue 15): an ensemble YAML lists member configs; train, predict, stack, submit and
compare accept it, through the real CLI on the synthetic competition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_helpers
from ich_kaggle.core import config, ensemble
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.labels import LABELS
from ich_kaggle.submit import stage as submission

ROOT = Path(__file__).resolve().parents[1]
L = list(LABELS)
cli = train_helpers.cli


def test_ensemble_config_checks_its_members(tmp_path):
    cfg = config.load("demo")
    assert cfg.is_ensemble and ensemble.member_names(cfg) == ["tiny", "tiny_bone"]
    assert [m.cv.k for m in ensemble.load_members(cfg)] == [3, 3]
    with pytest.raises(UserError, match="member 'tiny' has cv.k=5 but the ensemble has 3"):
        ensemble.load_members(config.load("demo", ["ensemble.member_set=[]"]))
    with pytest.raises(UserError, match="ensemble.weights"):
        config.load("demo", ["ensemble.weights=[1.0]"])
    assert [m.name for m in ensemble.load_members(config.load("seresnext_pair"))] == [
        "seresnext50_512",
        "seresnext101_480",
    ]
    winners = config.load("winners")  # the default recipe: three members, the embedding stage submitted
    assert [m.name for m in ensemble.load_members(winners)] == [
        "seresnext50_512",
        "seresnext101_480",
        "efficientnet_b3_bone",
    ]
    assert winners.stack.embedding_stage


@pytest.mark.slow
def test_ensemble_round_trips_through_train_predict_stack_submit_compare(pair, tmp_path):
    # the session's trained members (conftest's `pair`), combined here by the mean of probabilities
    ens = train_helpers.pair_yaml(tmp_path / "mean_pair.yaml", combine="mean")
    data, runs = pair.data, pair.runs
    exp = pair.exp(ens)
    for step in (["train", *exp, "--fold", "all"], ["predict", *exp], ["stack", *exp]):
        out = cli(*step)
        assert out.returncode == 0, out.stderr[-3000:]
        if step[0] == "train":
            assert out.stdout.count("is already trained") == 4, out.stdout  # the members' 2 folds: none retrained
    for member in ("tiny", "tiny_bone"):
        assert all((runs / member / f"fold{k}" / "done.json").exists() for k in range(2))
    pred = runs / "mean_pair" / "predictions"
    info = json.loads((pred / "ensemble.json").read_text())
    assert [m["run"] for m in info["members"]] == ["tiny", "tiny_bone"] and info["combine"] == "mean"
    assert set(info["oof_weighted_log_loss"]) == {"tiny", "tiny_bone", "ensemble"}
    members = [pd.read_csv(runs / m / "predictions" / "test.csv").set_index("image_id") for m in ("tiny", "tiny_bone")]
    combined = pd.read_csv(pred / "test.csv").set_index("image_id")
    assert not np.allclose(members[0][L], members[1].loc[members[0].index, L])  # two different members
    np.testing.assert_allclose(
        combined.loc[members[0].index, L], (members[0][L] + members[1].loc[members[0].index, L]) / 2, rtol=1e-6
    )
    metrics = pd.read_csv(runs / "mean_pair" / "stack" / "metrics.csv")
    assert {"first_stage:tiny", "first_stage:tiny_bone", "stacked"} <= set(metrics["stage"])

    out = cli("submit", *exp, "--out-dir", str(tmp_path / "subs"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OOF weighted log loss: stacked" in out.stdout
    choice = json.loads((runs / "mean_pair" / "choice.json").read_text())
    losses = choice["oof_log_loss"]
    assert choice["stage"] == min(losses, key=losses.get)
    sample = data / "stage_2_sample_submission.csv"
    assert submission.validate_file(sample, tmp_path / "subs" / "mean_pair.csv") == []

    out = cli("compare", "--runs", str(runs))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("mean_pair"))
    assert "2 mem" in row  # its members (120 columns; --wide names them)
    out = cli("compare", "--runs", str(runs), "--wide")
    row = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("mean_pair"))
    assert "ensemble of tiny, tiny_bone" in row

    # a member predicted again with another TTA: the ensemble's first stage is stale until predict recombines it
    out = cli("predict", "--config", "tiny", *exp[2:], "tta.transforms=identity", "train.seed=1")
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("submit", *exp, "--out-dir", str(tmp_path / "subs"))
    assert out.returncode == 2 and "mean_pair/predictions/test.csv is stale" in out.stderr
    out = cli("predict", *exp)  # the session's member as the other readers of `pair` expect it
    assert out.returncode == 0, out.stderr[-3000:]
