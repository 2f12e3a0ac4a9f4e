"""kohya's Hugging Face Hub flags: upload saved network files and '-state' folders (--huggingface_repo_id,
--save_state_to_huggingface, --async_upload) and download a state for --resume_from_huggingface. Every call to
the Hub goes through huggingface_hub.HfApi. When to call these is the trainer's business."""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from library.errors import FlagError

logger = logging.getLogger(__name__)

# one worker: uploads finish in the order the saves were made (kohya uses a thread pool for --async_upload)
_executor: ThreadPoolExecutor | None = None
_pending: list[Future] = []
_ensured_repos: set[tuple[str, str | None]] = set()

_NEEDS_REPO_ID = ("huggingface_path_in_repo", "huggingface_repo_visibility", "async_upload")


@dataclass(frozen=True)
class HubLocation:
    """A folder in a Hub repository, as `--resume owner/name/path/in/repo[:revision[:repo_type]]` names it."""

    repo_id: str
    path_in_repo: str
    revision: str | None = None
    repo_type: str | None = None


def check_hub_flags(args: argparse.Namespace) -> None:
    """Flag combinations of the Hub flags that cannot work; checked before any model loads.

    Raises:
        FlagError: --save_state_to_huggingface without a repository, --resume_from_huggingface without a
            --resume of the form owner/name/path[:revision[:repo_type]].
    """
    repo_id = getattr(args, "huggingface_repo_id", None)
    if getattr(args, "save_state_to_huggingface", False) and not repo_id:
        raise FlagError("--save_state_to_huggingface needs --huggingface_repo_id (the repository to upload the "
                        "'-state' folders to)")
    if not repo_id:
        for key in _NEEDS_REPO_ID:
            if getattr(args, key, None):
                logger.warning("--%s has no effect without --huggingface_repo_id; ignored", key)
    if getattr(args, "resume_from_huggingface", False):
        if not getattr(args, "resume", None):
            raise FlagError("--resume_from_huggingface needs --resume owner/name/path/in/repo[:revision[:repo_type]]"
                            " (the state folder on the Hub)")
        parse_hub_location(args.resume)


def parse_hub_location(text: str) -> HubLocation:
    """Split kohya's `owner/name/path/in/repo[:revision[:repo_type]]` (train_util.resume_from_local_or_hf)."""
    location, *suffixes = text.split(":")
    parts = [part for part in location.split("/") if part]
    if len(parts) < 2 or len(suffixes) > 2 or any(not suffix for suffix in suffixes):
        raise FlagError(f"--resume {text}: with --resume_from_huggingface expected "
                        "owner/name/path/in/repo[:revision[:repo_type]], e.g. me/my-lora/last-state:main")
    revision = suffixes[0] if suffixes else None
    repo_type = suffixes[1] if len(suffixes) == 2 else ("model" if suffixes else None)  # kohya's default
    return HubLocation(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision, repo_type)


def upload_saved(args: argparse.Namespace, path: str | Path, *, force_sync: bool = False) -> Future | None:
    """Upload a saved network file (with --huggingface_repo_id) or '-state' folder (with
    --save_state_to_huggingface too) to `--huggingface_path_in_repo/<its name>`, creating the repository
    (private unless --huggingface_repo_visibility public) when missing. With --async_upload it runs in a
    background thread (returned as a Future) unless `force_sync` (kohya uploads the final file synchronously).
    A failed upload is logged as an error and training goes on: the local file is kept. Call from the main
    process only; returns None when nothing was sent to a thread."""
    path = Path(path)
    if not getattr(args, "huggingface_repo_id", None):
        return None
    if path.is_dir() and not getattr(args, "save_state_to_huggingface", False):
        return None
    if getattr(args, "async_upload", False) and not force_sync:
        global _executor
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        future = _executor.submit(_upload, args, path)
        _pending.append(future)
        return future
    _upload(args, path)
    return None


def wait_for_uploads() -> None:
    """Block until every --async_upload upload has finished (call before the process exits)."""
    while _pending:
        _pending.pop(0).result()


def _upload(args: argparse.Namespace, path: Path) -> bool:
    import huggingface_hub

    repo_id, repo_type = args.huggingface_repo_id, getattr(args, "huggingface_repo_type", None)
    folder = (getattr(args, "huggingface_path_in_repo", None) or "").strip("/")
    path_in_repo = f"{folder}/{path.name}" if folder else path.name
    try:
        api = huggingface_hub.HfApi(token=getattr(args, "huggingface_token", None))
        _ensure_repo(api, args, repo_id, repo_type)
        if path.is_dir():
            api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(path), path_in_repo=path_in_repo)
        else:
            api.upload_file(repo_id=repo_id, repo_type=repo_type, path_or_fileobj=str(path),
                            path_in_repo=path_in_repo)
    except Exception as error:  # noqa: BLE001 - any Hub/network failure; the run goes on with the local file
        logger.error("uploading %s to %s/%s failed (%s: %s); the local copy is kept", path, repo_id, path_in_repo,
                     type(error).__name__, error)
        return False
    logger.info("uploaded %s to %s/%s", path, repo_id, path_in_repo)
    return True


def _ensure_repo(api, args: argparse.Namespace, repo_id: str, repo_type: str | None) -> None:
    if (repo_id, repo_type) in _ensured_repos:
        return
    if not api.repo_exists(repo_id, repo_type=repo_type):
        private = getattr(args, "huggingface_repo_visibility", None) != "public"  # kohya: private unless public
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        logger.info("created %s Hub repository %s", "private" if private else "public", repo_id)
    _ensured_repos.add((repo_id, repo_type))


def resume_folder(args: argparse.Namespace) -> Path | None:
    """The state folder --resume names: a local folder, or (--resume_from_huggingface) the downloaded one."""
    if not getattr(args, "resume", None):
        return None
    if getattr(args, "resume_from_huggingface", False):
        return download_state_for_resume(args)
    return Path(args.resume)


def download_state_for_resume(args: argparse.Namespace) -> Path:
    """Download every file under the Hub folder `--resume` names into the Hub cache; returns the local folder.

    Raises:
        FlagError: a malformed --resume, an unreachable repository or revision, or no files in that folder.
    """
    import huggingface_hub

    location = parse_hub_location(args.resume)
    repo_type = location.repo_type or getattr(args, "huggingface_repo_type", None)
    prefix = f"{location.path_in_repo}/" if location.path_in_repo else ""
    where = f"--resume {args.resume}"
    try:
        api = huggingface_hub.HfApi(token=getattr(args, "huggingface_token", None))
        files = [name for name in api.list_repo_files(location.repo_id, revision=location.revision,
                                                      repo_type=repo_type) if name.startswith(prefix)]
        if not files:
            raise FlagError(f"{where}: no files under '{location.path_in_repo or '/'}' in {location.repo_id}"
                            f"{'@' + location.revision if location.revision else ''}")
        logger.info("downloading %d state files from %s/%s", len(files), location.repo_id, location.path_in_repo)
        local = [Path(api.hf_hub_download(location.repo_id, name, revision=location.revision, repo_type=repo_type))
                 for name in files]
    except FlagError:
        raise
    except Exception as error:  # noqa: BLE001 - any Hub/network failure is one line naming --resume
        raise FlagError(f"{where}: download from the Hub failed ({type(error).__name__}: {error})") from error
    folder = local[0]
    for _ in Path(files[0][len(prefix):]).parts:
        folder = folder.parent
    return folder
