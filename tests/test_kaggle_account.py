"""A Kaggle account as a user has it today: only an access token ("Generate New Token"), no kaggle.json.

The real kaggle package talks to a fake Kaggle server (tests/fake_kaggle.py): it introspects the token to learn the
user name, and `kaggle-plan` asks it for the week's remaining GPU quota (`kaggle quota`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fake_kaggle import FakeKaggle

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "KGAT_0123456789abcdef0123456789abcdef"


def _token_only_env(fk: FakeKaggle, home: Path, token_in: str) -> dict[str, str]:
    """No KAGGLE_USERNAME / KAGGLE_KEY / kaggle.json: just the token, in the environment or in its file."""
    env = {k: v for k, v in fk.env().items() if k not in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR")}
    (home / ".kaggle").mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    if token_in == "env":
        env["KAGGLE_API_TOKEN"] = TOKEN
    else:
        (home / ".kaggle" / "access_token").write_text(TOKEN + "\n")
    return env


@pytest.mark.parametrize("token_in", ["env", "file"])
def test_the_user_name_is_read_from_the_access_token(tmp_path, monkeypatch, token_in):
    from ich_kaggle.kaggle import build

    with FakeKaggle(tokens={TOKEN: "tokenuser"}, max_seconds=30) as fk:
        for key in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        for key, value in _token_only_env(fk, tmp_path / "home", token_in).items():
            monkeypatch.setenv(key, value)
        assert build.check_username(None) == "tokenuser"
        assert build.check_username("given") == "given"  # KAGGLE_USERNAME= / --username still wins
        assert fk.calls("security.OAuthService/IntrospectToken")


def test_without_credentials_the_missing_user_name_is_one_line(tmp_path, monkeypatch):
    from ich_kaggle.core.errors import UserError
    from ich_kaggle.kaggle import build

    with FakeKaggle(max_seconds=30) as fk:  # the token below is unknown to this server: expired or revoked
        for key in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
            monkeypatch.delenv(key, raising=False)
        for key, value in _token_only_env(fk, tmp_path / "home", "env").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(UserError, match=r"no Kaggle username: .*KAGGLE_API_TOKEN.*KAGGLE_USERNAME=<you>") as e:
            build.check_username(None)
    assert "\n" not in str(e.value)


def test_kaggle_plan_reads_the_weeks_quota_with_a_token(tmp_path):
    """`make kaggle-plan` with a token: the real CLI's quota call, the hours left, and whether the plan fits."""
    cmd = [sys.executable, "-m", "ich_kaggle", "kaggle-plan", "--config", "kaggle_week", "--data", str(tmp_path)]
    with FakeKaggle(tokens={TOKEN: "tokenuser"}, gpu_quota=(12.0, 30.0), max_seconds=60) as fk:
        env = _token_only_env(fk, tmp_path / "home", "file")
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert fk.calls("kernels.KernelsApiService/GetAcceleratorQuotaStatistics")
    assert result.returncode == 0, result.stderr
    quota = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("quota:")]
    total = next(line for line in result.stdout.splitlines() if line.strip().startswith("total:"))
    hours = float(total.split("=")[1].split("GPU-hours")[0])
    assert hours <= 30.0  # kaggle_week fits a week of free quota
    fits = "fits" if hours <= 18.0 else "does not fit"
    assert quota and quota[0].startswith(f"quota: 18.0 h of GPU left this week: the plan {fits} in it"), quota
