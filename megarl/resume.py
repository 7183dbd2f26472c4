"""Which checkpoint a start resumes from: a run's committed checkpoints, whether each is whole,
and the choice ``checkpoint.resume`` and ``checkpoint.load_contents`` make among them.

A checkpoint is committed once it is named ``step_NNNNNNNN`` (:mod:`megarl.checkpoint` writes it
under a temporary name and renames it last); a committed checkpoint is whole when every file its
indexes point to is there and reads back (:func:`check_checkpoint`). Damaged checkpoints are
reported naming the file, and with ``auto`` set aside in favour of the newest whole one.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zipfile
from pathlib import Path

import torch.distributed as dist

COMMITTED = re.compile(r"^step_(\d{8})$")
"""The name of a committed checkpoint."""

log = logging.getLogger("megarl")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the directory and the problem."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (partial saves are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and COMMITTED.match(p.name)]
    return [path for _, path in sorted(found)]


def step_of(path: Path) -> int:
    return int(COMMITTED.match(path.name).group(1))


def committed_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a committed checkpoint (``step_NNNNNNNN``), else the latest
    committed checkpoint under it.

    Raises:
        CheckpointError: ``path`` is neither, naming it.
    """
    path = Path(path)
    if COMMITTED.match(path.name):
        if not (path / "weights").is_dir():
            raise CheckpointError(f"{path}: not a committed megarl checkpoint (it has no weights/ folder)")
        return path
    checkpoints = committed_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"{path}: no committed checkpoint (step_NNNNNNNN) in this directory")
    return checkpoints[-1]


def agreed_resume(resume: str, root: str | Path, contents: str = "all") -> tuple[Path | None, str]:
    """:func:`resolve_resume` of :func:`resume_choice` on the first rank (which may set a damaged
    checkpoint aside), its choice given to every rank (collective): the checkpoint to load, or
    None, and what to load from it (``all`` or ``model``)."""
    choice = [None]
    if dist.get_rank() == 0:
        resume, contents = resume_choice(resume, contents, root)
        choice = [(resolve_resume(resume, root), contents)]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def resume_choice(resume: str, contents: str, root: str | Path) -> tuple[str, str]:
    """``checkpoint.resume`` and ``checkpoint.load_contents`` as a start uses them: as given, except
    that a run started from another checkpoint's weights (``model``) that has committed checkpoints
    of its own under ``root`` goes on from its newest one, whole (``auto``, ``all``): the same
    command restarts a stopped run where it stopped, not from those weights at step 0 again (a
    source under ``root`` itself is left as given: the preflight refuses it)."""
    own = Path(root).resolve()
    if contents == "model" and Path(resume).resolve().parent != own and committed_checkpoints(own):
        return "auto", "all"
    return resume, contents


def resolve_resume(resume: str, root: str | Path, *, set_aside: bool = True) -> Path | None:
    """The checkpoint to resume from, its files checked (:func:`check_checkpoint`). Call it on one
    process only (the first rank): with ``auto`` it may set damaged checkpoints aside.

    Args:
        resume: ``"auto"`` (the latest intact committed checkpoint under ``root``, or None when
            there is none), ``"never"``, or the path of a checkpoint directory.
        root: the run's checkpoint directory.
        set_aside: with ``auto``, rename a damaged checkpoint newer than the one chosen
            ``step_NNNNNNNN.damaged`` (kept, never loaded or pruned), with a warning naming the
            damage; False only chooses (a check that must change nothing).

    Raises:
        CheckpointError: ``resume`` names no committed checkpoint, or a damaged one (the message
            names the damaged file and the newest intact checkpoint to resume from instead), or
            every checkpoint under ``root`` is damaged.
    """
    if resume == "never":
        return None
    if resume == "auto":
        intact, damaged = _newest_intact(Path(root))
        if intact is not None:
            for path, error in damaged if set_aside else ():
                aside = _set_aside(path)
                log.warning("%s; resuming from the newest intact checkpoint, %s; the damaged one is kept as %s", error, intact, aside)
            return intact
        if damaged:
            raise CheckpointError(
                f"{damaged[0][1]}; no checkpoint under {root} is intact ({len(damaged)} damaged): "
                f"start over with checkpoint.resume=never (the damaged ones are set aside at the first save), or restore the files"
            )
        return None
    path = Path(resume)
    if not COMMITTED.match(path.name) or not (path / "weights").is_dir():
        raise CheckpointError(
            f"checkpoint.resume = {resume!r} is not a committed megarl checkpoint (a directory "
            f"named step_NNNNNNNN with a weights/ folder); give one, or 'auto' / 'never'"
        )
    try:
        check_checkpoint(path)
    except CheckpointError as error:
        intact, _ = _newest_intact(path.parent, excluding=path)
        instead = (
            f"the newest intact checkpoint is {intact}: resume from it with checkpoint.resume={intact}, "
            f"or start over with checkpoint.resume=never"
            if intact is not None
            else f"no other checkpoint under {path.parent} is intact: start over with checkpoint.resume=never"
        )
        raise CheckpointError(f"{error}; {instead}") from None
    return path


def _newest_intact(root: Path, excluding: Path | None = None) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The newest committed checkpoint under ``root`` (``excluding`` one) whose files are whole, or
    None, and the damaged ones newer than it, each with what is wrong."""
    damaged = []
    for candidate in reversed(committed_checkpoints(root)):
        if excluding is not None and candidate.resolve() == excluding.resolve():
            continue
        try:
            check_checkpoint(candidate)
        except CheckpointError as error:
            damaged.append((candidate, error))
            continue
        return candidate, damaged
    return None, damaged


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the committed ones (``step_NNNNNNNN.damaged``), keeping it."""
    aside = path.with_name(f"{path.name}.damaged")
    if aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    path.rename(aside)
    return aside


def check_checkpoint(path: str | Path) -> None:
    """Check that ``path`` is a whole committed checkpoint: its folders, its state and every file
    (:func:`check_files`), before anything is built to load it.

    Raises:
        CheckpointError: naming the checkpoint and what is missing or damaged.
    """
    path = Path(path)
    for needed in ("weights", "train_state.json"):
        if not (path / needed).exists():
            raise CheckpointError(f"checkpoint {path} is damaged: {needed} is missing")
    check_files(path)


def _damaged(path: Path, problem: str) -> CheckpointError:
    checkpoint = next((parent for parent in (path, *path.parents) if COMMITTED.match(parent.name)), path.parent)
    return CheckpointError(f"checkpoint {checkpoint} is damaged: {path.relative_to(checkpoint)} {problem}")


def check_files(path: str | Path) -> None:
    """Check that every file of the committed checkpoint ``path`` is there and whole, before
    anything reads it: each distributed-checkpoint shard holds the bytes its ``.metadata`` index
    points to, and the torch and JSON files read back.

    Raises:
        CheckpointError: naming the checkpoint and the damaged file.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    for weights in sorted(path.glob("**/weights")):
        try:
            metadata = FileSystemReader(str(weights)).read_metadata()
        except Exception as error:  # pickle and I/O errors of a damaged index
            raise _damaged(weights / ".metadata", f"cannot be read ({type(error).__name__}: {error})") from None
        needed: dict[str, int] = {}
        for storage in metadata.storage_data.values():
            needed[storage.relative_path] = max(needed.get(storage.relative_path, 0), storage.offset + storage.length)
        for name, size in sorted(needed.items()):
            shard = weights / name
            if not shard.is_file():
                raise _damaged(shard, "is missing")
            if shard.stat().st_size < size:
                raise _damaged(shard, f"is truncated ({shard.stat().st_size} bytes of the {size} its index needs)")
    for saved in sorted(path.glob("**/*.pt")):
        try:
            with zipfile.ZipFile(saved) as archive:
                corrupt = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise _damaged(saved, f"is not a whole torch file ({error})") from None
        if corrupt is not None:
            raise _damaged(saved, f"is corrupt (its entry {corrupt} fails its checksum)")
    for state in sorted(path.glob("**/*.json")):
        try:
            json.loads(state.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _damaged(state, f"is not valid JSON ({error})") from None


