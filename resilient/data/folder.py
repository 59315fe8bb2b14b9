"""An image folder, :func:`resilient.data.image_folder`: one subfolder per class.

Caller side: the folder is listed once (:func:`list_folder`, in
``keras.utils.image_dataset_from_directory``'s order), its labels checked against the model, and the
listing with its seeded train/validation split stored as a :class:`FolderIndex` in
``data/image_folder.json``, so every attempt sees the same files. Worker side:
:class:`ImageFolderSource` decodes, resizes (to the plan's ``image_size`` when a ``lower_resolution``
step lowered it), caches and batches per the plan (:class:`FolderPipeline`). Resume is exact, with or
without the cache. A folder passed as ``validation_data`` is used whole: a :class:`FolderIndex` whose
``validation`` holds every file, carried in objects.pkl.

A folder on a FUSE or network file system (Google Drive on Colab): ``fit`` warns of the speed
(:func:`warn_if_slow_folder`), and the supervisor copies it to local disk in the background where there is
room (``local_copy.py``, :func:`folder_copy_jobs`); an attempt that starts once the copy is complete reads
the copy (:func:`with_local_copy`), with the same listing, so training is the same either way.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from .._errors import InvalidArgumentError, RunDirError
from .._plan import Plan
from .._rundir import ObjectData, RunDir, RunSpec, atomic_write_text
from . import IMAGE_FORMATS, ImageFolder
from .base import (
    VAL_OBJECT,
    EpochStream,
    Inputs,
    ObjectValidationInput,
    Source,
    ValidationInput,
    ValidationSource,
    autotune,
    epoch_order,
    epoch_span,
    span_steps,
)
from .checks import ModelFacts, check_sample_shape
from .local_copy import FolderCopyJob, choose_root

if TYPE_CHECKING:
    import tensorflow as tf

FOLDER_INDEX = "data/image_folder.json"

#: (files relative to the folder, labels or None, class names or None), as list_folder returns them.
Listing = tuple[tuple[str, ...], tuple[int, ...] | None, tuple[str, ...] | None]


class FolderIndex(BaseModel):
    """An image folder as listed once by fit: what the worker reads, so every attempt sees the same files.

    ``files`` are relative to ``root`` in sorted order; ``labels`` are class indices (one per file);
    ``train`` and ``validation`` index ``files``, in the order of the seeded split.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: ImageFolder
    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    train: tuple[int, ...]
    validation: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return (max(self.labels) + 1) if self.labels else 0


def read_folder_index(run: RunDir, key: str) -> FolderIndex:
    return FolderIndex.model_validate_json((run.path / key).read_text())


# ------------------------------------------------------------------------------------ caller: where it lives

#: The mount table read to tell where an image folder lives (a module constant: tests point it at a file).
MOUNTS = "/proc/self/mounts"
#: File system types that serve an image folder slowly, one small file at a time: FUSE mounts (Google Drive
#: on Colab, sshfs, gcsfuse, s3fs...) and network file systems.
SLOW_FILESYSTEMS = ("fuse", "nfs", "cifs", "smb", "9p", "afs", "davfs")


def filesystem_of(path: str, mounts: str | None = None) -> tuple[str, str] | None:
    """(mount point, type) of the file system that holds ``path``, from the mount table (None: unknown)."""
    try:
        table = mounts if mounts is not None else Path(MOUNTS).read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces, tabs and backslashes in mount points are octal escapes in the table.
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def is_slow_filesystem(fstype: str) -> bool:
    kind = fstype.lower()
    return kind.startswith(SLOW_FILESYSTEMS) and kind != "fuseblk"  # fuseblk: a local disk (ntfs-3g, exfat)


def warn_if_slow_folder(folder: ImageFolder, arg: str, mounts: str | None = None) -> str | None:
    """Warn (and return the text) when ``folder`` is on a FUSE or network file system: the worker reads it
    file by file there, in every attempt's first epoch and in every epoch once the plan drops the cache."""
    where = filesystem_of(folder.path, mounts)
    if where is None or not is_slow_filesystem(where[1]):
        return None
    point, fstype = where
    text = (f"resilient: the image folder {folder.path} ({arg}) is on a {fstype} file system (mounted at "
            f"{point}), which serves small files slowly (a Google Drive mount: tens a second). resilient copies it "
            "in the background to local disk beside run_dir (<run_dir>.images/) when the disk has room for it; "
            "attempts that start before the copy is complete, and every attempt when there is no room (the "
            "journal says why: folder_copy_skipped), read it there, one file at a time, in their first epoch and "
            "in every epoch once the plan drops the cache: expect slow epochs until then. Copy the folder to "
            "local disk yourself (e.g. `cp -r` it under /content) and pass that path to avoid the wait.")
    warnings.warn(text, UserWarning, stacklevel=2)
    return text


# ------------------------------------------------------------------------------------ caller: listing


def list_folder(folder: ImageFolder, *, arg: str = "x") -> Listing:
    """(files relative to the folder, labels, class names), in keras.utils.image_dataset_from_directory's order."""
    root = folder.path
    _check_root(root, arg)
    formats = " ".join(IMAGE_FORMATS)
    if folder.labels == "inferred":
        files, labels, class_names = _list_by_class(folder)
    else:
        files, labels, class_names = _list_with_labels(folder)
    if not files:
        where = f"in its {len(class_names)} class subfolders ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})" if class_names else "in it"
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder(). Received: path={root!r}, with no images {where}. "
            f"Expected at least one {formats} file."
        )
    if folder.label_mode == "binary" and folder.has_labels and class_names is not None and len(class_names) != 2:
        raise InvalidArgumentError(
            f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode='binary' with "
            f"{len(class_names)} classes ({', '.join(class_names[:5])}). Expected exactly 2 classes, or "
            "label_mode='int' / 'categorical'."
        )
    return tuple(files), (tuple(labels) if labels is not None and folder.has_labels else None), class_names


def _check_root(root: str, arg: str) -> None:
    if not os.path.exists(root):
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder() (passed as `{arg}`). Received: path={root!r}, which "
            "does not exist. Expected a directory of images with one subfolder per class (path/cat/1.png, ...)."
        )
    if not os.path.isdir(root):
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder() (passed as `{arg}`). Received: path={root!r}, which "
            "is a file. Expected a directory of images with one subfolder per class."
        )


def _list_by_class(folder: ImageFolder) -> tuple[list[str], list[int], tuple[str, ...]]:
    """``labels="inferred"``: the files of each class subfolder, labelled by the subfolder's index."""
    root = folder.path
    subdirs = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    if folder.class_names is not None:
        missing = [c for c in folder.class_names if c not in subdirs]
        if missing:
            raise InvalidArgumentError(
                f"Invalid value for argument `class_names` of image_folder(). Received: "
                f"class_names={list(folder.class_names)!r}; {missing!r} are not subfolders of {root}. "
                f"Expected names among its subfolders: {subdirs!r}."
            )
        subdirs = list(folder.class_names)
    if not subdirs:
        loose = len(_walk(root, folder.follow_links))
        detail = (
            f"it holds {loose} images directly but no class subfolders. Expected one subfolder per class "
            "(path/cat/1.png, path/dog/2.png), or labels=None for images without labels."
            if loose else f"Expected one subfolder per class holding {' '.join(IMAGE_FORMATS)} files."
        )
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder(). Received: path={root!r}, in which no class "
            f"subfolder was found: {detail}"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, sub in enumerate(subdirs):
        found = _walk(os.path.join(root, sub), folder.follow_links)
        files.extend(os.path.join(sub, f) for f in found)
        labels.extend([label] * len(found))
    return files, labels, tuple(subdirs)


def _list_with_labels(folder: ImageFolder) -> tuple[list[str], list[int] | None, tuple[str, ...] | None]:
    """``labels=None`` or one label per file: every image under the folder, in sorted order."""
    root = folder.path
    files = _walk(root, folder.follow_links)
    if not isinstance(folder.labels, tuple):
        return files, None, None
    labels = list(folder.labels)
    if len(labels) != len(files):
        raise InvalidArgumentError(
            f"Invalid value for argument `labels` of image_folder(). Received {len(labels)} labels for "
            f"{len(files)} image files in {root}. Expected one label per file, in the sorted order of the "
            "file paths."
        )
    if labels and min(labels) < 0:
        raise InvalidArgumentError(
            f"Invalid value for argument `labels` of image_folder(). Received labels from {min(labels)} to "
            f"{max(labels)}. Expected class indices >= 0."
        )
    return files, labels, (tuple(str(v) for v in range(max(labels) + 1)) if labels else ())


def _walk(directory: str, follow_links: bool) -> list[str]:
    """Image files under ``directory``, relative to it, sorted as Keras does (by folder, then name)."""
    out = []
    for root, _dirs, names in sorted(os.walk(directory, followlinks=follow_links), key=lambda t: t[0]):
        rel = os.path.relpath(root, directory)
        for name in sorted(names):
            if name.lower().endswith(IMAGE_FORMATS):
                out.append(name if rel == "." else os.path.join(rel, name))
    return out


def split(n: int, validation_split: float, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Train and validation file indices: a seeded shuffle of the files, the last part held out (as Keras)."""
    order = np.random.RandomState(seed % (2**32)).permutation(n)
    n_val = int(validation_split * n)
    return tuple(int(i) for i in order[: n - n_val]), tuple(int(i) for i in order[n - n_val:])


# ------------------------------------------------------------------------------------ caller: checks


def check_folder_labels(facts: ModelFacts, folder: ImageFolder, labels: tuple[int, ...] | None,
                        class_names: tuple[str, ...] | None) -> None:
    """The folder's classes and label_mode against the model's loss and output units."""
    if facts.loss is None or labels is None:
        return
    k = len(class_names) if class_names is not None else (max(labels) + 1)
    mode, loss = folder.label_mode, facts.loss_name
    names = f" ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})" if class_names else ""
    if facts.loss == "sparse":
        if mode != "int":
            raise InvalidArgumentError(
                f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode={mode!r} with loss "
                f"{loss}, which takes integer class indices. Expected label_mode='int' (or a categorical loss)."
            )
        if facts.units is not None and k > facts.units:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names}, labels 0 to "
                f"{k - 1}. Expected at most {facts.units} classes for {loss}: {facts.labels_hint()}. Give the last "
                f"layer {k} units (one per class), or pass class_names=[...] to use fewer classes."
            )
    elif facts.loss == "categorical":
        if mode != "categorical":
            raise InvalidArgumentError(
                f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode={mode!r} with loss "
                f"{loss}, which takes one-hot labels. Expected label_mode='categorical' (or "
                "loss='sparse_categorical_crossentropy' with label_mode='int')."
            )
        if facts.units is not None and k != facts.units:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names} (one-hot labels "
                f"of width {k}). Expected {facts.units} classes: {facts.labels_hint()}. Give the last layer {k} units."
            )
    elif facts.loss == "binary":
        if k > 2:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names} and loss {loss}. "
                "Expected 2 classes for a binary loss, or loss='sparse_categorical_crossentropy' with one output "
                "unit per class."
            )


def _check_images_fit(facts: ModelFacts, folder: ImageFolder, what: str) -> None:
    check_sample_shape(facts, folder.sample_shape(), what=what,
                       received=f"images of shape {folder.sample_shape()} (image_size={folder.image_size}, "
                                f"color_mode={folder.color_mode!r})")


def check_folder(folder: ImageFolder, facts: ModelFacts, validation_data: Any) -> Listing:
    """``x=image_folder(...)``: listed, its split and labels checked against the model and ``validation_data``."""
    listing = list_folder(folder)
    files, labels, class_names = listing
    n_val = int(folder.validation_split * len(files))
    if folder.validation_split > 0 and (n_val == 0 or n_val == len(files)):
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_split` of image_folder(). Received: "
            f"validation_split={folder.validation_split} of {len(files)} images, which leaves "
            f"{'no validation' if n_val == 0 else 'no training'} image. Expected a split that leaves at least "
            "one image on each side, or validation_split=0."
        )
    if folder.validation_split > 0 and validation_data is not None:
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_data`. Received validation_data={type(validation_data).__name__} "
            f"while x=image_folder(..., validation_split={folder.validation_split}) holds out its own validation "
            "images. Expected one of the two: pass validation_split=0, or validation_data=None."
        )
    _check_images_fit(facts, folder, "x")
    check_folder_labels(facts, folder, labels, class_names)
    warn_if_slow_folder(folder, "x")
    return listing


def prepare_folder_validation(folder: ImageFolder, facts: ModelFacts) -> ObjectValidationInput:
    """``validation_data=image_folder(...)``: the whole folder, listed and checked, carried as a FolderIndex."""
    files, labels, class_names = list_folder(folder, arg="validation_data")
    _check_images_fit(facts, folder, "validation_data")
    check_folder_labels(facts, folder, labels, class_names)
    warn_if_slow_folder(folder, "validation_data")
    index = FolderIndex(folder=folder, root=folder.path, files=files, labels=labels, class_names=class_names,
                        train=(), validation=tuple(range(len(files))))
    return ObjectValidationInput(index)


class FolderInputs(Inputs):
    kind = "image_folder"

    def __init__(self, folder: ImageFolder, listing: Listing, val: ValidationInput) -> None:
        super().__init__(val)
        self.folder = folder
        self.files, self.labels, self.class_names = listing
        self.source_image_size = folder.image_size
        self._stored: FolderIndex | None = None

    def _same(self, stored: FolderIndex) -> str | None:
        """Why ``stored`` is not this folder's listing (None: it is; the folder may have moved)."""
        mine = self.folder.model_dump(exclude={"path"})
        theirs = stored.folder.model_dump(exclude={"path"})
        if mine != theirs:
            changed = sorted(k for k in mine if mine[k] != theirs.get(k))
            return f"image_folder arguments differ: {', '.join(f'{k}={theirs.get(k)!r} then, {mine[k]!r} now' for k in changed)}"
        if stored.files != self.files or stored.labels != self.labels or stored.class_names != self.class_names:
            added = len(set(self.files) - set(stored.files))
            removed = len(set(stored.files) - set(self.files))
            return (f"the folder changed since the run started ({len(stored.files)} files then, {len(self.files)} now: "
                    f"{added} added, {removed} removed)")
        return None

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        super().check_resume(run, old)
        key = old.data.key if isinstance(old.data, ObjectData) else FOLDER_INDEX
        if not (run.path / key).exists():
            return
        try:
            stored = read_folder_index(run, key)
        except Exception as e:
            raise RunDirError(f"{run.path / key} cannot be read ({e}). Pass a new run_dir.") from None
        why = self._same(stored)
        if why is not None:
            raise RunDirError(
                f"The run directory {run.path} was trained on the image folder {stored.root}, and {why}. An exact "
                "resume needs the same files: restore the folder, or pass a new run_dir."
            )
        self._stored = stored

    def write(self, run: RunDir, seed: int) -> ObjectData:
        run.private_dir(run.data_dir)
        if self._stored is not None:
            # A resume: the same files and split; only the folder's location may have changed.
            index = self._stored.model_copy(update={"folder": self.folder, "root": self.folder.path})
        else:
            split_seed = self.folder.seed if self.folder.seed is not None else seed
            train, validation = split(len(self.files), self.folder.validation_split, split_seed)
            index = FolderIndex(folder=self.folder, root=self.folder.path, files=self.files, labels=self.labels,
                                class_names=self.class_names, train=train, validation=validation)
        atomic_write_text(run.path / FOLDER_INDEX, index.model_dump_json())
        return ObjectData(kind="image_folder", key=FOLDER_INDEX, val_key=self.val.write(run), samples=len(index.train))


def folder_copy_jobs(inputs: Inputs) -> tuple[FolderCopyJob, ...]:
    """The image folders of a fit call (``x``, ``validation_data``), as the background copy takes them."""
    jobs = []
    if isinstance(inputs, FolderInputs):
        jobs.append(FolderCopyJob(role="x", root=inputs.folder.path, files=inputs.files))
    val = inputs.objects.get(VAL_OBJECT)
    if isinstance(val, FolderIndex):
        jobs.append(FolderCopyJob(role="validation_data", root=val.root, files=val.files))
    return tuple(jobs)


def stored_folder_copy_jobs(run: RunDir, spec: RunSpec) -> tuple[FolderCopyJob, ...]:
    """``resume``'s jobs: the ``x`` folder from its stored index (a ``validation_data`` folder lives in
    objects.pkl, which the supervisor does not unpickle; it is read where it is)."""
    data = spec.data
    if not (isinstance(data, ObjectData) and data.kind == "image_folder"):
        return ()
    try:
        index = read_folder_index(run, data.key)
    except (OSError, ValueError):
        return ()  # the worker reports a damaged index
    return (FolderCopyJob(role="x", root=index.root, files=index.files),)


# ------------------------------------------------------------------------------------ worker


def with_local_copy(index: FolderIndex, run: RunDir, role: str) -> tuple[FolderIndex, dict[str, Any] | None]:
    """``index`` read from its complete local copy when there is one (only the root changes), and what to
    journal of the choice (None: no copy was ever started)."""
    root, note = choose_root(run.path, role, index.root, index.files)
    return (index if root == index.root else index.model_copy(update={"root": root})), note


def encode_labels(index: FolderIndex, ids: np.ndarray) -> np.ndarray | None:
    """Labels of files ``ids`` per the folder's label_mode: int32 (n,), one-hot float32 (n, k), float32 (n, 1)."""
    folder = index.folder
    if not folder.has_labels or index.labels is None:
        return None
    raw = np.asarray(index.labels, dtype=np.int64)[ids]
    if folder.label_mode == "categorical":
        return np.eye(index.num_classes, dtype=np.float32)[raw]
    if folder.label_mode == "binary":
        return raw.astype(np.float32).reshape(-1, 1)
    return raw.astype(np.int32)


class FolderPipeline:
    """Decoded, resized images of one subset of a folder, with a lazily filled in-memory cache."""

    def __init__(self, index: FolderIndex, subset: Literal["train", "validation"]) -> None:
        ids = np.asarray(index.train if subset == "train" else index.validation, dtype=np.int64)
        self.folder = index.folder
        self.paths = np.asarray([os.path.join(index.root, index.files[i]) for i in ids], dtype=object)
        self.labels = encode_labels(index, ids)
        self.n = len(ids)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def size(self, plan: Plan) -> tuple[int, int]:
        return tuple(plan.image_size or self.folder.image_size)  # type: ignore[return-value]

    def _load_fn(self, size: tuple[int, int]) -> Any:
        import tensorflow as tf

        channels, method = self.folder.channels, self.folder.interpolation

        def load(path: Any) -> Any:
            image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
            image = tf.cast(tf.image.resize(image, size, method=method), tf.float32)
            image.set_shape((*size, channels))
            return image

        return load

    def _with_labels(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """(positions, images) batches -> (images, labels), or images alone when unlabelled."""
        import tensorflow as tf

        if self.labels is None:
            return ds.map(lambda pos, images: images)
        labels = tf.constant(self.labels)
        return ds.map(lambda pos, images: (images, tf.gather(labels, pos)))

    def dataset(self, positions: np.ndarray, plan: Plan, *, cache: bool) -> tf.data.Dataset:
        """Batches of the images at ``positions`` (indices into this subset), in that order."""
        import tensorflow as tf

        size = self.size(plan)
        ds = tf.data.Dataset.from_tensor_slices(np.asarray(positions, dtype=np.int64))
        if cache and self._cached(size):
            ds = self._from_cache(ds, plan, size)
        else:
            ds = self._decoded(ds, plan, size, cache=cache)
        return self._with_labels(ds).prefetch(autotune(plan.prefetch))

    def stream(self, positions: Any, plan: Plan, *, cache: bool) -> tf.data.Dataset:
        """``dataset`` for positions read per iterator (``positions()``: a new dataset of them, see
        ``EpochStream``): with the cache, each epoch reads it once it is complete, as ``dataset`` does."""
        import tensorflow as tf

        size = self.size(plan)
        if not cache:
            return self._with_labels(self._decoded(positions(), plan, size, cache=False)).prefetch(
                autotune(plan.prefetch))
        decoded = self._decoded(positions(), plan, size, cache=True)
        cached = self._from_cache(positions(), plan, size)

        def which() -> np.ndarray:
            return np.asarray(1 if self._cached(size) else 0, dtype=np.int64)

        def choose(_: Any) -> tf.data.Dataset:
            branch = tf.numpy_function(which, [], tf.int64, stateful=True)
            branch.set_shape(())
            return tf.data.Dataset.from_tensors(branch).repeat()

        # Decided once per iterator (an epoch), when its first batch is asked for.
        choice = tf.data.Dataset.range(1).flat_map(choose)
        ds = tf.data.Dataset.choose_from_datasets([decoded, cached], choice, stop_on_empty_dataset=True)
        return self._with_labels(ds).prefetch(autotune(plan.prefetch))

    def _cached(self, size: tuple[int, int]) -> bool:
        """Whether every image of the subset is in the cache at ``size``."""
        entry = self._cache.get(size)
        return entry is not None and bool(entry[1].all())

    def _from_cache(self, positions: tf.data.Dataset, plan: Plan, size: tuple[int, int]) -> tf.data.Dataset:
        """(positions, images) batches read from the cache (complete when the iterator runs)."""
        import tensorflow as tf

        shape = (*size, self.folder.channels)

        def gather(pos: np.ndarray) -> np.ndarray:
            return self._cache[size][0][pos]

        def from_cache(pos: Any) -> Any:
            images = tf.numpy_function(gather, [pos], tf.float32, stateful=False)
            images.set_shape((None, *shape))
            return pos, images

        return positions.batch(plan.batch_size).map(from_cache, num_parallel_calls=autotune(plan.parallel_calls),
                                                    deterministic=True)

    def _decoded(self, positions: tf.data.Dataset, plan: Plan, size: tuple[int, int], *,
                 cache: bool) -> tf.data.Dataset:
        """(positions, images) batches decoded from the files; stored in the cache as they pass when ``cache``."""
        import tensorflow as tf

        shape = (*size, self.folder.channels)
        paths = tf.constant(self.paths.astype(str))
        load = self._load_fn(size)
        ds = positions.map(lambda pos: (pos, load(tf.gather(paths, pos))),
                           num_parallel_calls=autotune(plan.parallel_calls), deterministic=True)
        ds = ds.batch(plan.batch_size)
        if cache:
            ds = ds.map(self._store_fn(size, shape))
        return ds

    def _store_fn(self, size: tuple[int, int], shape: tuple[int, ...]) -> Any:
        """A map that copies each decoded batch into the cache (filled as the first full pass decodes)."""
        import tensorflow as tf

        with self._lock:
            if size not in self._cache:
                # np.empty: pages are only committed as images are stored.
                self._cache[size] = (np.empty((self.n, *shape), dtype=np.float32), np.zeros(self.n, dtype=bool))
        store, filled = self._cache[size]

        def keep(pos: np.ndarray, images: np.ndarray) -> np.ndarray:
            store[pos] = images
            filled[pos] = True
            return images

        def stored(pos: Any, images: Any) -> Any:
            out = tf.numpy_function(keep, [pos, images], tf.float32, stateful=True)
            out.set_shape(images.shape)
            return pos, out

        return stored

    def validation_dataset(self, plan: Plan, *, cache: bool) -> tf.data.Dataset:
        """The whole subset in file order; a fixed order, so ``tf.data`` ``cache()`` is exact here."""
        import tensorflow as tf

        size = self.size(plan)
        paths = tf.constant(self.paths.astype(str))
        load = self._load_fn(size)
        ds = tf.data.Dataset.from_tensor_slices(np.arange(self.n, dtype=np.int64))
        ds = ds.map(lambda pos: (pos, load(tf.gather(paths, pos))), num_parallel_calls=autotune(plan.parallel_calls),
                    deterministic=True)
        if cache:
            ds = ds.cache()
        return self._with_labels(ds.batch(plan.batch_size)).prefetch(autotune(plan.prefetch))


class FolderValidationSource(ValidationSource):
    """A folder's validation subset (or a whole folder passed as validation_data), in file order."""

    def __init__(self, index: FolderIndex, subset: Literal["train", "validation"] = "validation") -> None:
        self._pipe = FolderPipeline(index, subset)

    def dataset(self, plan: Plan) -> tf.data.Dataset:
        return self._pipe.validation_dataset(plan, cache=bool(plan.cache and self._pipe.folder.cache))


class ImageFolderSource(Source):
    """An image folder (``resilient.data.image_folder``). Resume is exact, with or without the cache."""

    def __init__(self, spec: RunSpec, index: FolderIndex, val: ValidationSource | None) -> None:
        self.index = index
        self._pipe = FolderPipeline(index, "train")
        self.n = self._pipe.n
        if val is None and index.validation:
            val = FolderValidationSource(index, "validation")
        super().__init__(spec, val)

    def _positions(self, epoch: int, offset: int) -> np.ndarray:
        order, start, end = epoch_span(self.spec, epoch, self.n)
        return epoch_order(self.spec.seed, order, self.n, self.spec.shuffle)[start + offset:end]

    def epoch(self, plan: Plan, epoch: int, offset: int) -> tuple[tf.data.Dataset, int]:
        positions = self._positions(epoch, offset)
        cache = bool(plan.cache and self.index.folder.cache)
        ds = self._pipe.dataset(positions, plan, cache=cache)
        return self._weighed(ds), math.ceil(len(positions) / plan.batch_size)

    def epochs(self, plan: Plan) -> EpochStream:
        stream = EpochStream(self._positions, lambda e, o: span_steps(self.spec, e, o, self.n, plan.batch_size))
        cache = bool(plan.cache and self.index.folder.cache)
        stream.dataset = self._weighed(self._pipe.stream(stream.positions_dataset, plan, cache=cache))
        return stream
