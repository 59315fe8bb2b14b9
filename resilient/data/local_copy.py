"""A local copy of an image folder that sits on a slow mount (Google Drive on Colab, NFS...).

Where: ``<run_dir>.images/<role>/`` (``role``: ``x`` or ``validation_data``), a sibling of the run directory:
on the same local disk as ``run_dir``, and outside it, since ``mirror_dir`` copies the run directory to Drive
and must not carry the images back there. It is kept after the run (another ``fit`` on the run uses it);
delete it when the run is done with.

Supervisor side (``supervisor/folder_copy.py``): a background thread copies the files there, one by one (a
temporary name, the size checked, then a rename), when the folder is on a slow file system and the local
disk has room for its bytes plus :data:`MARGIN_FRACTION` and :data:`MARGIN_BYTES`
(:func:`copy_refusal`); it writes :data:`MANIFEST` last. Worker side (:func:`choose_root`): an attempt reads
the copy only when that manifest, at the attempt's start, lists this folder's files and the copy holds
their bytes; otherwise the original. Only the root changes: the listing, its order and the labels come
from the ``FolderIndex`` that ``fit`` stored, so training is the same from either root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .._units import format_bytes

#: Written in the copy's folder after every file is in place: the copy is complete.
MANIFEST = ".resilient-copy.json"
#: Room the local disk must keep beyond the folder's bytes: 10% of them plus 1 GiB.
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 1 << 30


class CopyManifest(BaseModel):
    """What a complete copy holds: the folder it copies, its file count and bytes, and a digest of its listing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    files: int
    bytes: int
    listing: str
    seconds: float = 0.0


class FolderCopyJob(BaseModel):
    """An image folder of the run (``role``: the fit argument it came as), listed as the worker reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    root: str
    files: tuple[str, ...]


def copy_dir(run_path: str | os.PathLike[str], role: str) -> Path:
    """``<run_dir>.images/<role>``: where the local copy of a run's image folder goes."""
    return Path(os.fspath(run_path).rstrip(os.sep) + ".images") / role


def listing_digest(files: tuple[str, ...] | list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def room_needed(total_bytes: int) -> int:
    """Free bytes the local disk must have for a copy of ``total_bytes``."""
    return int(total_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def copy_refusal(*, total_bytes: int, free_bytes: int, dest: str, dest_fstype: str | None) -> str | None:
    """Why no local copy is made (None: copy): the destination is a slow mount too, or has no room."""
    from .folder import is_slow_filesystem

    if dest_fstype is not None and is_slow_filesystem(dest_fstype):
        return (f"{dest} is on a {dest_fstype} file system too: no local disk to copy to (put run_dir on "
                "local disk, e.g. under /content, and use mirror_dir for Drive)")
    need = room_needed(total_bytes)
    if free_bytes < need:
        return (f"no room: the copy needs {format_bytes(need)} free ({format_bytes(total_bytes)} of images + "
                f"{MARGIN_FRACTION:.0%} + {format_bytes(MARGIN_BYTES)}), {format_bytes(free_bytes)} is free at {dest}")
    return None


def read_manifest(folder: Path) -> CopyManifest | None:
    try:
        return CopyManifest.model_validate_json((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_copy(folder: Path, root: str, files: tuple[str, ...]) -> str | None:
    """Why the copy in ``folder`` cannot stand for ``root``'s ``files`` (None: it can)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "no complete copy yet (no manifest)"
    if manifest.source != root:
        return f"the copy is of {manifest.source}, not {root}"
    if manifest.files != len(files) or manifest.listing != listing_digest(files):
        return f"the copy lists {manifest.files} files, other than the run's {len(files)}"
    try:
        have = sum(os.stat(folder / f).st_size for f in files)
    except OSError as e:
        return f"a file of the copy is missing ({e})"
    if have != manifest.bytes:
        return f"the copy holds {have} bytes, its manifest {manifest.bytes}"
    return None


def choose_root(run_path: str | os.PathLike[str], role: str, root: str,
                files: tuple[str, ...]) -> tuple[str, dict[str, object] | None]:
    """The root an attempt reads ``files`` from: the local copy when it verifies, else ``root``; and what to
    journal (``folder_read``), or None when there is no copy folder at all."""
    folder = copy_dir(run_path, role)
    if not folder.is_dir():
        return root, None
    why = verify_copy(folder, root, files)
    if why is None:
        return str(folder), {"role": role, "from_copy": True, "path": str(folder), "source": root, "files": len(files)}
    return root, {"role": role, "from_copy": False, "path": root, "reason": why}
