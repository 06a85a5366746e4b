"""Every call to Kaggle, through the kaggle package's Python API, with its outcome checked.

The `kaggle` CLI exits 0 when the server refuses (`datasets create` of a dataset that exists, a refused `kernels
push`: it prints the error and returns), so `make` looked green when nothing was uploaded. Here each answer is read:
an error field, an HTTP error or a failed upload becomes one UserError line with Kaggle's own message and the fix.

The steps from trained folds to a score, in order (each a `python -m ich_kaggle` subcommand and a Make target):
datasets-create (first time) or datasets-version -> datasets-wait -> kernel-push -> kernel-wait -> kernel-output ->
kaggle-submit.
"""

from __future__ import annotations

import logging
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UserError
from ..core.layout import COMPETITION

log = logging.getLogger(__name__)

RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
CREDENTIALS_FIX = (
    "create an API token (kaggle.com > Settings > API > Create New Token) and set KAGGLE_API_TOKEN "
    "to it, or save it as ~/.kaggle/access_token, or run `kaggle auth login`; a legacy kaggle.json in "
    "~/.kaggle (or KAGGLE_USERNAME + KAGGLE_KEY) still works"
)
SUBMISSION = "submission.csv"
# kernel session states (kagglesdk KernelWorkerStatus names) that end a run
KERNEL_DONE = {"COMPLETE"}
KERNEL_FAILED = {"ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"}


def client():
    """An authenticated KaggleApi. `import kaggle` would authenticate at import and print a page of help on
    failure; the class itself is quiet until `authenticate`, which exits on missing credentials."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package's own import-time attempt prints too
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError:
            raise UserError(
                "the kaggle package is not installed; pip install kaggle (it is in requirements.txt)"
            ) from None
        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:
            raise UserError(f"no Kaggle credentials: {CREDENTIALS_FIX}") from None
        except Exception as e:  # an access token is checked on Kaggle's server: offline, that request fails
            raise UserError(f"could not check the Kaggle credentials with kaggle.com ({_message(e)})") from None
    return api


def account_name() -> str | None:
    """The Kaggle user name of the credentials on this machine, or None where there are none.

    The kaggle package reads it from whatever authenticated: an access token (`KAGGLE_API_TOKEN`,
    ~/.kaggle/access_token) is introspected on Kaggle's server, `kaggle auth login` caches it, a legacy kaggle.json
    holds it. So a user who only pasted a token never has to type their name again."""
    try:
        api = client()
    except UserError:
        return None
    name = str((getattr(api, "config_values", None) or {}).get("username") or "").strip()
    return name or None


def _message(error: BaseException) -> str:
    """Kaggle's words for a failed request (HTTPError carries the server's `message`), one line."""
    text = str(error).strip() or type(error).__name__
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", None) and str(response.status_code) not in text:
        text = f"HTTP {response.status_code}: {text}"
    return " ".join(text.split())


def call(what: str, fn: Callable[[], Any], fix: str = "") -> Any:
    """Run one API call; any failure becomes `<what> failed: <Kaggle's message>; <fix>`."""
    import requests

    try:
        return fn()
    except (requests.RequestException, ValueError, OSError) as e:
        raise UserError(f"{what} failed: {_message(e)}" + (f"; {fix}" if fix else "")) from None


def _refused(result: Any) -> str | None:
    """The error of an answer that came back 200 but says no (`error` field, or a status other than ok)."""
    if result is None:
        return "no answer (see the output above)"
    error = getattr(result, "error", None)
    if error:
        return str(error)
    status = getattr(result, "status", None)
    if isinstance(status, str) and status and status.lower() != "ok":
        return f"status {status}"
    return None


def dataset_id(folder: Path) -> str:
    meta = folder / "dataset-metadata.json"
    if not meta.is_file():
        raise UserError(f"{meta} not found; run `make kernel-datasets` first")
    return str(json.loads(meta.read_text())["id"])


def dataset_status(api, ref: str) -> str | None:
    """`ready`, `pending`, ... or None when Kaggle has no such dataset (or it is not yours to see)."""
    import requests

    try:
        return str(api.dataset_status(ref)).lower()
    except requests.HTTPError as e:
        if e.response is not None and e.response.status_code in (403, 404):
            return None
        raise UserError(f"status of dataset {ref} failed: {_message(e)}") from None
    except (requests.RequestException, ValueError) as e:
        raise UserError(f"status of dataset {ref} failed: {_message(e)}") from None


def create_datasets(folders: list[Path]) -> list[str]:
    """`kaggle datasets create` for each folder; an existing dataset is a UserError that says to version it."""
    api = client()
    refs, existing = [], []
    for folder in folders:
        ref = dataset_id(folder)
        if dataset_status(api, ref) is not None:
            existing.append(ref)  # the others are still created, so that datasets-version then finds them all
            continue
        result = call(
            f"creating dataset {ref} from {folder}",
            lambda: api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip"),
        )
        refused = _refused(result)
        if refused:
            hint = (
                "it exists: use `make datasets-version`"
                if "already" in refused.lower() or "in use" in refused.lower()
                else "check the dataset-metadata.json there and that your account is verified"
            )
            raise UserError(f"Kaggle refused to create dataset {ref} from {folder}: {refused}; {hint}")
        log.info(
            f"created dataset {ref}: {getattr(result, 'url', '') or ''} (Kaggle processes it for a few minutes: "
            f"make datasets-wait)"
        )
        refs.append(ref)
    if existing:
        raise UserError(
            f"dataset {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''} on Kaggle; "
            f"upload the new files with `make datasets-version` (python -m ich_kaggle datasets-version)"
        )
    return refs


def version_datasets(folders: list[Path], message: str) -> list[str]:
    """`kaggle datasets version` for each folder; a dataset that does not exist yet says to create it."""
    api = client()
    refs = []
    for folder in folders:
        ref = dataset_id(folder)
        if dataset_status(api, ref) is None:
            raise UserError(f"dataset {ref} does not exist on Kaggle yet; create it with `make datasets-create`")
        result = call(
            f"new version of dataset {ref} from {folder}",
            lambda: api.dataset_create_version(str(folder), message, quiet=True, dir_mode="zip"),
        )
        refused = _refused(result)
        if refused:
            raise UserError(f"Kaggle refused a new version of dataset {ref}: {refused}")
        log.info(f"new version of dataset {ref} ({message}): {getattr(result, 'url', '') or ''}")
        refs.append(ref)
    return refs


def wait_datasets(refs: list[str], timeout: float = 1800, poll: float = 15) -> None:
    """Until every dataset is `ready` (a kernel pushed before that sees no files or the old version)."""
    api = client()
    deadline = time.monotonic() + timeout
    pending = list(refs)
    while pending:
        for ref in list(pending):
            status = dataset_status(api, ref)
            if status is None:
                raise UserError(f"dataset {ref} not found on Kaggle; upload it with `make datasets-create`")
            if status == "ready":
                log.info(f"dataset {ref}: ready")
                pending.remove(ref)
            elif status in ("failed", "deleted"):
                raise UserError(
                    f"dataset {ref} is {status} on Kaggle; see its page, fix it and run `make datasets-version`"
                )
        if pending:
            if time.monotonic() > deadline:
                raise UserError(
                    f"dataset(s) {', '.join(pending)} still not ready after {timeout:.0f} s; rerun "
                    f"`make datasets-wait` later (Kaggle processes large uploads for a while)"
                )
            time.sleep(poll)


SOURCE_KINDS = ("dataset", "competition", "kernel", "model")


def invalid_sources(result: Any) -> list[tuple[str, list[str]]]:
    """Every `invalid*Sources` field of a push's answer that is not empty: (kind, names). Kaggle accepts a kernel
    whose sources it cannot attach and says so only there."""
    out = []
    for kind in SOURCE_KINDS:
        camel = f"invalid{kind.capitalize()}Sources"
        names = getattr(result, f"invalid_{kind}_sources", None) or getattr(result, camel, None)
        if names:
            out.append((kind, [str(n) for n in names]))
    return out


def push_kernel(folder: Path) -> str:
    """`kaggle kernels push`; Kaggle's refusal (the CLI prints it and exits 0) is a UserError."""
    if not (folder / "kernel-metadata.json").is_file():
        raise UserError(f"{folder / 'kernel-metadata.json'} not found; write the kernel first (make kernel)")
    api = client()
    result = call(f"pushing kernel {folder}", lambda: api.kernels_push(str(folder)))
    refused = _refused(result)
    if refused:
        raise UserError(f"Kaggle refused the kernel in {folder}: {refused}")
    bad = invalid_sources(result)
    if bad:
        kind, names = bad[0]
        fix = {
            "competition": f"accept the competition rules at {RULES_URL}",
            "kernel": "push those kernels first and let them complete (make kernel-status); an ensemble's kernels "
            "are its members' (make kernel-train CONFIG=<ensemble> fold=N pushes them)",
            "model": "check the model sources in kernel-metadata.json",
        }.get(
            kind,
            "upload them first (make kernel-code, make kernel-weights, make datasets-create) and wait until "
            "they are ready (make datasets-wait)",
        )
        raise UserError(f"Kaggle accepted the kernel in {folder} without its {kind} sources {list(names)}; {fix}")
    log.info(
        f"pushed {result.ref or folder} version {result.versionNumber}: {result.url} (follow it: make kernel-wait)"
    )
    return str(result.url or "")


def wait_kernel(kernel: str, timeout: float = 12.5 * 3600, poll: float = 60) -> str:
    """Until the kernel's run ends; a failed run is a UserError with Kaggle's failure message."""
    api = client()
    deadline = time.monotonic() + timeout
    last = None
    while True:
        response = call(
            f"status of kernel {kernel}",
            lambda: api.kernels_status(kernel),
            fix="check the kernel id (KAGGLE_USERNAME, SLUG)",
        )
        status = getattr(response.status, "name", str(response.status)).upper()
        if status != last:
            log.info(f"kernel {kernel}: {status.lower()}")
            last = status
        if status in KERNEL_DONE:
            return status
        if status in KERNEL_FAILED:
            why = getattr(response, "failure_message", "") or "no message"
            raise UserError(
                f"kernel {kernel} ended with {status.lower()}: {why}; read its log with "
                f"`make kernel-output` (kernels/output/<slug>.log)"
            )
        if time.monotonic() > deadline:
            raise UserError(f"kernel {kernel} still {status.lower()} after {timeout:.0f} s; rerun `make kernel-wait`")
        time.sleep(poll)


def fetch_output(kernel: str, dest: Path) -> Path:
    """`kaggle kernels output`: the run's submission.csv (and its log) into `dest`."""
    api = client()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SUBMISSION).unlink(missing_ok=True)  # never mistake an earlier run's file for this run's
    files, _ = call(
        f"output of kernel {kernel}",
        lambda: api.kernels_output(kernel, str(dest), force=True, quiet=True),
        fix="check the kernel id (KAGGLE_USERNAME, SLUG) and that it finished (make kernel-wait)",
    )
    path = dest / SUBMISSION
    if not path.is_file():
        logs = [f for f in files if str(f).endswith(".log")]
        raise UserError(
            f"kernel {kernel} has no {SUBMISSION} in its output"
            + (f"; read its log {logs[0]}" if logs else "; did its last run finish (make kernel-wait)?")
        )
    check_submission(path)
    log.info(f"fetched {path}" + "".join(f" and {f}" for f in files if str(f).endswith(".log")))
    return path


def check_submission(path: Path) -> None:
    """A downloaded (or local) submission is what Kaggle scores, not an error page saved under its name: the header
    `ID,Label`, IDs `ID_<image>_<subtype>` with all six subtypes of each image, labels finite in [0, 1].
    (The sample submission is not needed: the GPU-less journey has no competition files here.)"""
    import numpy as np
    import pandas as pd

    from ..core.labels import LABELS

    fix = "fetch it again (make kernel-output) or rebuild it (make submit)"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        sub = pd.read_csv(path, compression="gzip" if head == b"\x1f\x8b" else None, dtype={"ID": str})
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a submission CSV ({type(e).__name__}); {fix}") from None
    if list(sub.columns) != ["ID", "Label"] or sub.empty:
        raise UserError(
            f"{path} is not a submission: columns {list(sub.columns)[:4]} with {len(sub)} rows, expected "
            f"ID,Label; {fix}"
        )
    parts = sub["ID"].str.rsplit("_", n=1)
    subtype = parts.str[1]
    bad_type = ~subtype.isin(LABELS)
    if bad_type.any():
        raise UserError(f"{path}: ID {sub['ID'][bad_type].iloc[0]!r} is not ID_<image>_<subtype>; {fix}")
    labels = pd.to_numeric(sub["Label"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(labels).all() or (labels < 0).any() or (labels > 1).any():
        raise UserError(f"{path}: Label values must be probabilities in [0, 1]; {fix}")
    counts = parts.str[0].value_counts()
    if (counts != len(LABELS)).any() or sub["ID"].duplicated().any():
        wrong = (counts != len(LABELS)).to_numpy()
        culprit = counts.index[wrong][0] if wrong.any() else "a duplicated ID"
        raise UserError(f"{path}: every image needs its {len(LABELS)} subtypes exactly once ({culprit}); {fix}")


def submit_file(path: Path, message: str) -> str:
    """`kaggle competitions submit` of a CSV, checked first (`check_submission`); a refusal (rules not accepted,
    daily limit) is a UserError."""
    if not path.is_file():
        raise UserError(f"{path} not found; fetch the kernel's output first (make kernel-output)")
    check_submission(path)
    api = client()
    fix = f"accept the competition rules at {RULES_URL} (late submissions are scored)"
    result = call(
        f"submitting {path} to {COMPETITION}",
        lambda: api.competition_submit(str(path), message, COMPETITION, quiet=True),
        fix=fix,
    )
    text = str(getattr(result, "message", "") or "")
    if text == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise UserError(f"submitting {path} to {COMPETITION} failed: {text} (upload failed); retry")
    log.info(
        f"submitted {path} to {COMPETITION} ({message!r}): {text or 'ok'}; the score appears at "
        f"https://www.kaggle.com/competitions/{COMPETITION}/submissions"
    )
    return text
