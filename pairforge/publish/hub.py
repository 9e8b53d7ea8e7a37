"""``pairforge publish``: stage the exact Hub repo layout locally, load it back with
``datasets.load_dataset``, then push the whole folder in one commit.

Order of work: read the set (:mod:`pairforge.publish.pairset`) → parquet shards
(:mod:`~pairforge.publish.layout`) → card and plots (:mod:`~pairforge.publish.card`) → verify
every config → stop here with ``dry_run`` → offline check → token → ``whoami`` (a bad token
or no network fails here, before anything is created) → ``create_repo(exist_ok=True)`` (and the
branch) → one ``create_commit`` with a ``CommitOperationAdd`` per staged file.

The token comes from ``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``). It is
passed to ``HfApi`` calls only: never printed, logged or written, and every error message that
leaves this module has it cut out (:func:`redact`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pairforge import __version__
from pairforge.errors import PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.publish.card import SECRET, write_card
from pairforge.publish.layout import (
    MAX_SHARD_BYTES,
    ConfigFiles,
    MARKER,
    abandon_staging,
    begin_staging,
    finish_staging,
    staging_error,
    verify,
    write_data,
)
from pairforge.publish.pairset import PairSet, is_build_dir, open_pairset
from pairforge.safety import redacted_model_names

if TYPE_CHECKING:
    from rich.console import Console

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
REPO_TYPE = "dataset"
TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class PublishResult:
    """What ``publish`` did: the staged folder, its files (repo paths), the staged configs and
    the commit (or pull request) URL (``None`` for a dry run)."""

    staging: Path
    files: list[str]
    configs: list[ConfigFiles]
    commit_url: str | None = None
    pr_url: str | None = None

    @property
    def rows(self) -> dict[str, int]:
        """Rows per config."""
        return {c.name: c.n_rows for c in self.configs}


def default_staging(path: str | os.PathLike) -> Path:
    """``DIR/hub`` for a build dir; ``<set>.hub`` beside a plain dataset folder or file."""
    p = Path(path)
    if is_build_dir(p):
        return p / "hub"
    return p.with_name(p.stem + ".hub") if p.is_file() else p.with_name(p.name + ".hub")


def stage(pset: PairSet, staging: Path, *, repo_id: str, license: str | None = None,
          tokenizer: str = "gpt2", max_shard_bytes: int = MAX_SHARD_BYTES,
          progress: bool = True) -> list[ConfigFiles]:
    """Write the repo layout of ``pset`` into ``staging`` and verify it loads; returns the
    staged configs. The layout is written into a temporary sibling folder and moved to
    ``staging`` once verified, so a killed run leaves nothing half-written under that name;
    ``staging`` itself must be new, empty, or an earlier pairforge staging
    (:func:`~pairforge.publish.layout.check_staging`)."""
    if not len(pset.dataset):
        raise PairforgeError(f"{pset.where}: the set has no pairs, so there is nothing to "
                             f"publish (see its summary.json / rejects.jsonl for why)")
    tmp = begin_staging(staging)
    try:
        configs = {name: redacted_model_names(ds) for name, ds in pset.configs().items()}
        staged = write_data(configs, tmp, max_shard_bytes=max_shard_bytes, progress=progress)
        features = pset.dataset.features
        write_card(tmp, pset, staged, features, repo_id=repo_id, license=license,
                   tokenizer=tokenizer, configs=configs)
        verify(tmp, staged, features, {name: list(ds["id"]) for name, ds in configs.items()})
        finish_staging(tmp, staging)
    except OSError as e:
        abandon_staging(tmp)
        raise staging_error(staging, e) from None
    except BaseException:
        abandon_staging(tmp)
        raise
    return staged


def staged_files(staging: Path) -> list[str]:
    """Every file under ``staging`` as a repo path, sorted (not the staging marker)."""
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                  if p.is_file() and p.name != MARKER)


def publish(path: str | os.PathLike, repo_id: str, *, private: bool = False,
            revision: str | None = None, create_pr: bool = False, dry_run: bool = False,
            staging: str | os.PathLike | None = None, license: str | None = None,
            tokenizer: str = "gpt2", max_shard_bytes: int = MAX_SHARD_BYTES,
            image_root: str | os.PathLike | None = None,
            console: Console | None = None) -> PublishResult:
    """Stage, verify and (unless ``dry_run``) push the pair set at ``path`` to ``repo_id``.

    Images that rows only point to must lie inside ``image_root`` (default: the build dir,
    or the set's own folder), be at most :data:`pairforge.safety.MAX_IMAGE_BYTES` and decode;
    one row that fails stops the publish with a line naming it, before anything is staged."""
    from rich.console import Console

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    if not REPO_ID.match(repo_id):
        raise PairforgeError(f"--repo-id {repo_id!r}: expected ORG/NAME (letters, digits, "
                             f"'-', '_', '.')")
    pset = open_pairset(path, image_root=image_root)
    folder = Path(staging) if staging is not None else default_staging(path)
    staged = stage(pset, folder, repo_id=repo_id, license=license, tokenizer=tokenizer,
                   max_shard_bytes=max_shard_bytes)
    files = staged_files(folder)
    result = PublishResult(folder, files, staged)
    size = sum((folder / f).stat().st_size for f in files)
    rows = ", ".join(f"{name} {n:,}" for name, n in result.rows.items())
    console.print(f"staged {len(files)} files ({size / 1e6:.1f} MB; rows: {rows}) in {folder}; "
                  f"every config loads with datasets.load_dataset", highlight=False)
    if dry_run:
        console.print(f"dry run: not pushed (in {time.perf_counter() - t0:.1f} s)")
        return result
    if offline():
        raise PairforgeError(f"HF_HUB_OFFLINE is set, so nothing was pushed; the verified "
                             f"repo is staged in {folder}: unset HF_HUB_OFFLINE and rerun "
                             f"the command to push it")
    token = hub_token()
    info = push(folder, files, repo_id, token=token, private=private, revision=revision,
                create_pr=create_pr, message=_commit_message(pset, result))
    result.commit_url = getattr(info, "commit_url", None)
    result.pr_url = getattr(info, "pr_url", None)
    where = result.pr_url or result.commit_url or repo_id
    console.print(f"pushed {len(files)} files to {repo_id} in one commit: {where} "
                  f"(in {time.perf_counter() - t0:.1f} s)", highlight=False)
    return result


# ----------------------------------------------------------------------------- the Hub


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set now (the env var) or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


def hub_token() -> str:
    """The token from ``HF_TOKEN`` or the login cache; a one-line error when there is none."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as e:  # noqa: BLE001 - e.g. a failed OIDC exchange (HF_OIDC_RESOURCE)
        raise PairforgeError(redact(f"cannot get a Hugging Face token ({_first_line(e)}); set "
                                    f"HF_TOKEN or run `hf auth login`", None)) from None
    if not token:
        raise PairforgeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, "
                             "then rerun (the staged folder is kept)")
    return token


def redact(text: str, token: str | None) -> str:
    """``text`` with the token (and anything shaped like an HF or API key) cut out."""
    if token:
        text = text.replace(token, "[token]")
    return SECRET.sub("[token]", text)


def push(folder: Path, files: list[str], repo_id: str, *, token: str, private: bool,
         revision: str | None, create_pr: bool, message: str):
    """Create the repo (and branch) if needed and commit all ``files`` at once; returns the
    ``CommitInfo``. Hub and network failures become one-line errors without the token."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(library_name="pairforge", library_version=__version__)
    step = "check the token"
    try:
        api.whoami(token=token)
        step = "create the repo"
        api.create_repo(repo_id, token=token, repo_type=REPO_TYPE, private=private,
                        exist_ok=True)
        if revision and revision != "main":
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, token=token, repo_type=REPO_TYPE,
                              exist_ok=True)
        step = "commit"
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f))
               for f in files]
        return api.create_commit(repo_id, ops, commit_message=message, token=token,
                                 repo_type=REPO_TYPE, revision=revision, create_pr=create_pr)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one line without the token
        raise PairforgeError(redact(_hub_error(e, step, repo_id, folder), token)) from None


def _hub_error(e: Exception, step: str, repo_id: str, folder: Path) -> str:
    """One line for a failed Hub call: a refused token, no network, or what the Hub said."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kept = f"the staged folder {folder} is kept"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return (f"the Hugging Face token was refused (401) at '{step}'; set a valid HF_TOKEN "
                f"or run `hf auth login`, then rerun ({kept})")
    if isinstance(e, HfHubHTTPError) and status == 403:
        return (f"the token may not write to {repo_id} (403) at '{step}'; use a token with "
                f"write access to that namespace ({kept})")
    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or _is_network(e):
        return (f"cannot reach the Hugging Face Hub at '{step}' ({_first_line(e)}); nothing "
                f"was pushed: rerun when online ({kept})")
    return f"the Hub refused '{step}' for {repo_id} ({_first_line(e)}); {kept}"


def _is_network(e: Exception) -> bool:
    """A transport-level failure of the HTTP client (no response at all)."""
    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub releases use httpx or requests
        try:
            import httpx
        except ImportError:
            return False
    return isinstance(e, httpx.TransportError)


def _commit_message(pset: PairSet, result: PublishResult) -> str:
    what = pset.recipe or "audited"
    rows = sum(result.rows.values())
    return f"pairforge {__version__}: {what} pairs ({rows:,} rows, {len(result.rows)} config(s))"
