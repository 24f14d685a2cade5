"""Output folders that are never half-written, never mixed with old files and never deleted by accident.

``staged_folder(dest, overwrite)`` hands out an empty folder beside ``dest``; when the block ends
without an error, it is renamed to ``dest`` (an existing ``dest`` is moved aside first and deleted
last, so a crash at any point leaves either the old or the new folder, never a mix). A non-empty
``dest`` is refused unless ``overwrite``; a failure removes the staging folder and leaves ``dest`` as
it was. Staging folders left by a killed process (``.DEST.tmp-*``, ``.DEST.old-*``) are removed
by the next write to the same destination.

Permissions follow the umask, as for any file a user writes. safetensors (>= 0.7) writes its files
through the Rust ``tempfile`` crate (mode 0600) and ``tempfile.mkdtemp`` makes 0700 folders, so without
``apply_umask`` an exported model is unreadable for the group (e.g. a shared inference server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class DestinationError(ValueError):
    """A destination folder that cannot be written as asked (one line: what, then the path)."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the permissions a fresh ``open``/``mkdir`` would get."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(base, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def check_destination(dest: Path, overwrite: bool, protect: tuple = ()) -> None:
    """Refuse a destination that holds files (unless ``overwrite``), that is a file, or that would
    overlap one of the ``protect`` folders (e.g. the checkpoint being exported)."""
    dest = Path(dest)
    resolved = dest.resolve()
    for keep in protect:
        keep = Path(keep).resolve()
        if resolved == keep or resolved in keep.parents or keep in resolved.parents:
            raise DestinationError(f"the destination would hold or replace {keep}; choose a folder outside it ({dest})")
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise DestinationError(f"the destination exists and is not a folder ({dest})")
        if any(dest.iterdir()) and not overwrite:
            raise DestinationError(f"the destination folder is not empty; pass --overwrite to replace it ({dest})")


@contextlib.contextmanager
def staged_folder(dest: Path, overwrite: bool = False, protect: tuple = ()) -> Iterator[Path]:
    dest = Path(dest)
    check_destination(dest, overwrite, protect)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed (SIGKILL, power loss)
    stage = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        yield stage
        apply_umask(stage)
        check_destination(dest, overwrite, protect)  # again: something may have appeared meanwhile
        move_into_place(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def move_into_place(stage: Path, dest: Path) -> None:
    """Rename the finished folder `stage` to `dest`; an existing `dest` is swapped out, then removed."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(stage, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)
