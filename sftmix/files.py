"""Shared file helpers: atomic writes (files, folders, figures), JSONL, content hashes, the cache location,
output directories.

Every result sftmix writes goes through `write_atomic`, so a killed process never
leaves half a file that a rerun would mistake for a finished one. An output directory
is claimed (`OutputLock`) before any work, so an unwritable one or one in use by another
run is refused at start-up, and a checkpoint is resumed from only when it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import InputError

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_the_umask_says(staging: str | Path) -> None:
    """mkstemp makes 0600 files; a result is as readable as any file the user's umask lets them create."""
    os.chmod(staging, 0o666 & ~_umask())


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        _as_the_umask_says(staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Copy a file so that `target` is either absent, the old file, or the whole new one."""
    target = Path(target)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        shutil.copyfile(source, staging)
        _as_the_umask_says(staging)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Fill a staging folder beside `target`, then rename it into place; a crash leaves no half folder.

    Yields the staging folder. On success it replaces `target`, or, with `keep_existing`, gives
    way to a `target` that another process finished first (a cache both filled). On an error the
    staging folder is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
    try:
        yield staging
        if target.exists() and not keep_existing:
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (keep_existing and target.exists()):  # lost a race to another writer: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def jsonl_text(rows: Iterable[dict[str, Any]], user_data: bool = False) -> str:
    """One JSON object per line, non-ASCII text kept as it is.

    sftmix's own results refuse NaN and inf (they are not JSON; a NaN score is a bug to see).
    A copy of the user's records (`user_data`: a split, a mixture, a subset) keeps what they hold:
    NaN as Python writes and reads it, and values JSON has no type for (dates, bytes from Parquet
    or the hub) as strings, so copying data never fails.
    """
    options: dict[str, Any] = {"default": str} if user_data else {"allow_nan": False}
    return "".join(json.dumps(row, ensure_ascii=False, **options) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]], user_data: bool = False) -> None:
    """`jsonl_text(rows, user_data)`, written atomically."""
    write_atomic(path, jsonl_text(rows, user_data))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file written by sftmix (user data goes through `data.load_records`)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a name that can be a hub model or dataset id
SMALL_MODEL_BYTES = 64 << 20  # below this, a model's files are identified by their content, above by size and time
NOT_WEIGHTS = ("optim", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")


def model_identity(name_or_path: str | Path) -> dict[str, Any]:
    """What identifies a model's weights cheaply: for each weight and config file (also in FSDP / DeepSpeed shard
    folders), a content hash when the model is small (< 64 MiB), else its size and modification time. A hub id
    stands for itself. Optimizer and scheduler states are left out: they do not change a model's outputs."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return {"hub_id": str(name_or_path)}
    folders = [path] + sorted(sub for sub in path.iterdir()
                              if sub.is_dir() and sub.name.startswith(("pytorch_model_fsdp", "global_step")))
    files = sorted(
        file for folder in folders for file in folder.iterdir() if file.is_file()
        and not any(part in file.name for part in NOT_WEIGHTS)
        and (file.suffix in (".safetensors", ".bin", ".distcp", ".pt") or file.name.endswith(".index.json")
             or file.name in ("config.json", "adapter_config.json", ".metadata"))
    )
    small = sum(file.stat().st_size for file in files) <= SMALL_MODEL_BYTES
    return {str(file.relative_to(path)): file_hash(file) if small else [file.stat().st_size, file.stat().st_mtime_ns]
            for file in files}


def cache_error(err: BaseException, what: str) -> InputError | None:
    """The one-line error of a cache write that failed because the cache is read-only, missing or full (named as
    the cache's, not the output directory's), or None when `err` is something else."""
    full = out_of_space(err, cache_root())
    if full is None and not isinstance(err, OSError):
        return None
    reason = f"the disk is full: {full}" if full else (getattr(err, "strerror", None) or str(err))
    return InputError(f"cannot write {what} into the cache {cache_root()} ({reason}): set SFTMIX_CACHE to a "
                      "writable folder with free space")


def cache_root() -> Path:
    """$SFTMIX_CACHE, else ~/.cache/sftmix: the converted default model and tokenised datasets."""
    return Path(os.environ.get("SFTMIX_CACHE") or Path.home() / ".cache" / "sftmix")  # set but empty: unset


# --------------------------------------------------------------------------- output directories


def check_writable(directory: str | Path) -> None:
    """Create `directory` and a file in it now, so an unwritable output is refused before any work, not after it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".sftmix-write-test.")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{directory}: cannot write to the output directory ({err.strerror or err}); choose "
                         "another --output_dir or fix its permissions") from err


# Below this much free space a failed write is taken to be the full disk: torch.save reports a full
# disk only as "unexpected pos N vs M" (its errno is lost), so the error alone cannot tell.
FULL_DISK_BYTES = 64 * 2**20
_OUT_OF_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def out_of_space(error: BaseException, directory: str | Path) -> str | None:
    """Why `error` is a full disk under `directory` (a short reason), or None when it is something else."""
    seen = error
    while seen is not None:  # the error, its cause, their context: whichever layer kept the errno
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen.strerror or str(seen)
        if any(text in str(seen) for text in _OUT_OF_SPACE_TEXT):
            return str(seen).splitlines()[0][:200]
        seen = seen.__cause__ or seen.__context__
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    return f"{free / 2**20:.1f} MiB left on its disk" if free < FULL_DISK_BYTES else None


class OutputLock:
    """One sftmix command at a time per output directory: an exclusive `flock` on `<dir>/.sftmix.lock`.

    The operating system releases the lock when its process ends, however it ends, so a
    crashed or killed run never leaves a directory locked (its file stays and is reused). The
    file names the holder (pid, host, start time, command) for the message a second run
    prints, and is removed when the run ends normally.
    """

    FILE = ".sftmix.lock"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self.handle = None

    def acquire(self) -> None:
        check_writable(self.directory)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (NFS, Lustre)
                    handle.close()
                    logger.warning("%s: this filesystem does not lock files (%s); sftmix cannot tell whether "
                                   "another run writes here: do not start two at once", self.directory,
                                   err.strerror or err)
                    return
                handle.seek(0)
                holder = handle.read().strip() or "holder unknown"
                handle.close()
                raise InputError(f"{self.directory} is in use by another sftmix run ({holder}); wait for it to end, "
                                 "or use another --output_dir") from None
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()  # the previous holder removed the file after we opened it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                     f"command: {' '.join(sys.argv)[:300]}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks a file that is going away
            self.handle.close()  # closing the file releases the lock
            self.handle = None


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


DIGEST = "sftmix_digest.json"  # written into a checkpoint once it is whole: its files' sizes, its weights' hashes


def checkpoint_is_complete(path: Path) -> bool:
    """Trainer writes a checkpoint's trainer_state.json last and sftmix its digest after it: complete = both are
    there, the state names this step, and weights exist.

    A process killed while `checkpoint-N` is written leaves weights without trainer_state.json,
    a trainer_state.json cut short, or no digest; none can be resumed from.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    match = CHECKPOINT.fullmatch(path.name)
    if not isinstance(state, dict) or match is None or state.get("global_step") != int(match.group(1)):
        return False
    engine_states = list(path.glob("pytorch_model_fsdp*")) + list(path.glob("global_step*"))  # FSDP, DeepSpeed
    has_weights = any((path / name).is_file() for name in WEIGHT_FILES) or bool(engine_states)
    return has_weights and (path / DIGEST).is_file()


def write_digest(checkpoint: Path) -> None:
    """Record, once `checkpoint` is whole, every file's size and each weight file's hash (`checkpoint_damage`)."""
    files = {}
    for path in sorted(item for item in checkpoint.rglob("*") if item.is_file() and item.name != DIGEST):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if path.name.endswith(".safetensors"):  # the weights: what zeroing or a partial copy changes unseen
            entry["sha256"] = file_hash(path)
        files[path.relative_to(checkpoint).as_posix()] = entry
    write_atomic(checkpoint / DIGEST, json.dumps(files, indent=1))


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What in `checkpoint` differs from its digest (a file cut short, weights overwritten), or None when nothing
    does. Files gone since are not damage: a reference run's older checkpoints keep only their weights."""
    try:
        recorded = json.loads((checkpoint / DIGEST).read_text())
    except FileNotFoundError:
        return None  # not written by sftmix: nothing to compare with
    except ValueError:
        return f"its {DIGEST} does not parse"
    for name, entry in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            continue
        if path.stat().st_size != entry["size"]:
            return f"{name} is {path.stat().st_size} bytes, {entry['size']} when it was written"
        if "sha256" in entry and file_hash(path) != entry["sha256"]:
            return f"{name} changed since it was written"
    return None


def newest_complete_checkpoint(directory: str | Path, also_needs: tuple[str, ...] = ()) -> str | None:
    """The newest complete, undamaged `checkpoint-N` in `directory` (holding `also_needs` files too); the others are
    named as they are passed over."""
    directory = Path(directory)
    found = sorted(
        (int(match.group(1)), path) for path in (directory.iterdir() if directory.is_dir() else [])
        if (match := CHECKPOINT.fullmatch(path.name)) and path.is_dir()
    )
    for _, path in reversed(found):
        if not (checkpoint_is_complete(path) and all((path / name).exists() for name in also_needs)):
            logger.warning("%s is incomplete (the run was killed while writing it?): not resumed from; it is "
                           "written again when training reaches that step", path)
        elif damage := checkpoint_damage(path):
            logger.warning("%s is damaged (%s): not resumed from; an older checkpoint is, and this one is written "
                           "again when training reaches that step (or delete it)", path, damage)
        else:
            return str(path)
    return None


# What a checkpoint holds only to be resumed from (HF Trainer, FSDP, DeepSpeed); engine folders also hold the
# weights, so they go only when the checkpoint has weights of its own (what `model.loadable_checkpoint` reads).
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "optimizer_0",
               "global_step*/*optim_states.pt")
ENGINE_STATES = ("global_step*", "pytorch_model_fsdp_*", "latest", "zero_to_fp32.py")


def strip_training_state(checkpoint: Path) -> None:
    """Leave `checkpoint` what loading its weights needs (weights, config, tokenizer, trainer_state.json):
    it can no longer be resumed from, only scored or loaded."""
    has_weights = any(checkpoint.glob("*.safetensors")) or any(checkpoint.glob("pytorch_model*.bin"))
    for pattern in RESUME_ONLY + (ENGINE_STATES if has_weights else ()):
        for path in checkpoint.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def refuse_writing_over_inputs(outputs: dict[str, str | Path], inputs: dict[str, Any]) -> None:
    """Refuse, before any work, an output that is one of the inputs (the same file or folder however it is
    spelled: ./x, a symlink, an absolute path): sftmix never writes over what the user owns.

    outputs: option -> path written; inputs: option -> a path, a list of paths, or None."""
    given = [(option, value) for option, values in inputs.items()
             for value in (values if isinstance(values, (list, tuple)) else [values]) if isinstance(value, (str, Path))]
    for out_option, output in outputs.items():
        target = Path(output).expanduser().resolve()
        for in_option, value in given:
            if Path(value).expanduser().resolve() == target:
                raise InputError(f"{out_option} {output} is {in_option} {value}: sftmix never writes over its inputs; "
                                 f"choose another {out_option}")


def packaged_file(distribution: str, suffix: str, install_hint: str) -> Path:
    """The first file ending in `suffix` inside an installed pip distribution (found without importing it)."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError as err:
        raise InputError(f"the embedded default is not installed: {install_hint}") from err
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate())
    raise InputError(f"the installed {distribution} package holds no {suffix} file: reinstall it "
                     f"(pip install --force-reinstall {distribution})")
