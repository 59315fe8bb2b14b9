"""Inputs for ``resilient.fit`` beyond NumPy arrays.

``resilient.fit(model, x, ...)`` accepts, for ``x`` and for ``validation_data``:

- **NumPy arrays** ``x, y`` (and ``validation_data=(x_val, y_val)``), as for ``model.fit``. They are
  stored once in ``run_dir/data`` (written in chunks: a ``np.memmap`` is never loaded whole) and the
  worker memory-maps them. Resume is exact.
- **An image folder**, :func:`image_folder`: one subfolder per class, like
  ``keras.utils.image_dataset_from_directory``. The worker decodes, resizes (to the plan's
  ``image_size`` when a ``lower_resolution`` step lowered it), caches and batches per the plan.
  Its ``validation_split`` gives the validation data. Resume is exact.
- **A dataset factory**: a function ``make_dataset(plan)`` returning a *batched* ``tf.data.Dataset``
  of ``(x, y)`` (or ``(x, y, sample_weight)``). See :class:`DatasetFactory`. ``validation_data`` may
  be a factory too.
- **A** ``keras.utils.PyDataset`` **instance**: carried to the worker by value, indexed batch by batch.

A ``tf.data.Dataset`` object itself cannot be carried to another process faithfully; wrap its
construction in a factory. Everything is checked against the model before any worker starts, and a
refused call leaves the run directory as it was.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._errors import InvalidArgumentError

if TYPE_CHECKING:
    from .._plan import Plan

__all__ = ["DatasetFactory", "ImageFolder", "image_folder"]

Interpolation = Literal["bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic"]
ColorMode = Literal["grayscale", "rgb", "rgba"]
LabelMode = Literal["int", "categorical", "binary"]

#: File extensions an image folder indexes (case-insensitive), as keras.utils.image_dataset_from_directory.
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}


class ImageFolder(BaseModel):
    """A folder of images, one subfolder per class: what :func:`image_folder` returns (frozen).

    The worker turns it into a ``tf.data`` pipeline per plan and epoch: the files of the training
    subset in the epoch's order (a permutation that depends on ``(fit seed, epoch)`` only), decoded
    with ``tf.io.decode_image``, resized to ``plan.image_size`` or else ``image_size``, batched by
    ``plan.batch_size`` and prefetched per ``plan.prefetch`` with ``plan.parallel_calls`` decoders.

    Cache: with ``cache`` here and ``plan.cache`` both true, decoded and resized images are kept in the
    worker's memory, indexed by file, as the first full pass over them decodes them; later epochs
    gather from the cache in the epoch's order. The order is therefore the same with or without the
    cache, and so are the values, so a resume (or a ``drop_cache`` step) stays exact. It costs
    ``4 * height * width * channels`` bytes per training image (float32, like Keras's pipeline);
    ``drop_cache`` turns it off after a host OOM. The validation subset is cached with
    ``tf.data.Dataset.cache()``. ``plan.shuffle_buffer`` is not used: the order is an exact permutation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["image_folder"] = "image_folder"
    path: str = Field(description="The folder, absolute. With labels='inferred', one subfolder per class.")
    image_size: tuple[int, int] = Field((256, 256), description="(height, width) images are resized to.")
    validation_split: float = Field(0.2, description="Fraction of the files held out as validation data.")
    labels: Literal["inferred"] | tuple[int, ...] | None = "inferred"
    label_mode: LabelMode | None = "int"
    class_names: tuple[str, ...] | None = None
    color_mode: ColorMode = "rgb"
    interpolation: Interpolation = "bilinear"
    seed: int | None = Field(None, description="Seed of the train/validation split; None: fit's seed.")
    cache: bool = True
    follow_links: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> str:
        if isinstance(value, (str, os.PathLike)) and str(os.fspath(value)).strip():
            return os.path.abspath(os.path.expanduser(os.fspath(value)))
        raise ValueError(f"Received: path={value!r}. Expected a path to a directory (a str or os.PathLike).")

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if (
            isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        ):
            return (int(value[0]), int(value[1]))
        raise ValueError(f"Received: image_size={value!r}. Expected (height, width) of positive integers.")

    @field_validator("validation_split", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
            return float(value)
        raise ValueError(f"Received: validation_split={value!r}. Expected a number in [0, 1) (0: no validation).")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if value is None or value == "inferred":
            return value
        if isinstance(value, str):
            raise ValueError(f"Received: labels={value!r}. Expected 'inferred', None, or a list of integer labels.")
        try:
            items = list(value)
        except TypeError:
            raise ValueError(
                f"Received: labels={type(value).__name__}. Expected 'inferred', None, or a list of integer labels."
            ) from None
        out = []
        for item in items:
            if isinstance(item, bool) or not hasattr(item, "__index__"):
                raise ValueError(f"Received a label {item!r} in `labels`. Expected integers (one per image file).")
            out.append(int(item))
        return tuple(out)

    @field_validator("class_names", mode="before")
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"Received: class_names={value!r}. Expected a list of subfolder names.")
        return tuple(value)

    @model_validator(mode="after")
    def _consistent(self) -> ImageFolder:
        if self.class_names is not None and self.labels != "inferred":
            raise ValueError(
                f"Received: class_names={list(self.class_names)!r} with labels={self._labels_repr()}. "
                "Expected class_names only with labels='inferred' (they name and order the class subfolders)."
            )
        if self.labels is not None and self.label_mode is None:
            raise ValueError(
                f"Received: label_mode=None with labels={self._labels_repr()}. Expected labels=None for images "
                "without labels, or label_mode 'int', 'categorical' or 'binary'."
            )
        return self

    def _labels_repr(self) -> str:
        if isinstance(self.labels, tuple):
            return f"<{len(self.labels)} labels>"
        return repr(self.labels)

    @property
    def channels(self) -> int:
        """Channels per decoded image: 1 (grayscale), 3 (rgb) or 4 (rgba)."""
        return _CHANNELS[self.color_mode]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and self.label_mode is not None

    def sample_shape(self, image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """The shape of one decoded image: ``(height, width, channels)``."""
        h, w = image_size or self.image_size
        return (h, w, self.channels)


def image_folder(
    path: str | os.PathLike[str],
    image_size: tuple[int, int] | int = (256, 256),
    validation_split: float = 0.2,
    labels: Literal["inferred"] | list[int] | tuple[int, ...] | None = "inferred",
    color_mode: ColorMode = "rgb",
    *,
    label_mode: LabelMode | None = "int",
    class_names: list[str] | tuple[str, ...] | None = None,
    interpolation: Interpolation = "bilinear",
    seed: int | None = None,
    cache: bool = True,
    follow_links: bool = False,
) -> ImageFolder:
    """A folder of images for ``resilient.fit``, like ``keras.utils.image_dataset_from_directory``.

    Args:
        path: the folder. With ``labels="inferred"``, one subfolder per class: ``path/cat/1.png``,
            ``path/dog/7.jpg``...; class indices follow the sorted subfolder names (or ``class_names``).
            Files ending in .bmp, .gif, .jpeg, .jpg or .png are indexed, recursively, in sorted order.
        image_size: ``(height, width)`` every image is resized to (a ``lower_resolution`` step may
            lower it further for an attempt; the model's spatial input dims must then be None).
        validation_split: the fraction of files held out as validation data, chosen by a seeded
            shuffle of the file list (as Keras does); 0 for none. As ``validation_data`` of fit, a
            folder is used whole and this is not applied.
        labels: ``"inferred"`` (from the subfolders), ``None`` (images only), or one integer per file,
            in the sorted order of the file paths.
        color_mode: ``"grayscale"``, ``"rgb"`` or ``"rgba"`` (1, 3 or 4 channels).
        label_mode: ``"int"`` (integer labels, for sparse_categorical_crossentropy), ``"categorical"``
            (one-hot, for categorical_crossentropy), ``"binary"`` (float 0/1 of shape (1,), for
            binary_crossentropy; needs exactly two classes).
        class_names: the class subfolders to use, in label order (default: all, sorted).
        interpolation: the ``tf.image.resize`` method.
        seed: seed of the train/validation split; None uses fit's ``seed``.
        cache: whether the worker may keep decoded images in memory (it does when ``plan.cache``
            too; ``drop_cache`` turns it off). See :class:`ImageFolder` for how the cache keeps the
            epoch order exact.
        follow_links: whether to follow symbolic links to subfolders.

    Returns:
        A frozen :class:`ImageFolder` spec. Nothing is read until ``resilient.fit`` lists the folder
        (before any worker starts: a missing path, an empty folder or labels the model cannot take
        are refused there).

    Raises:
        InvalidArgumentError: an argument has the wrong type or value.

    Example:
        >>> train = resilient.data.image_folder("flowers/", image_size=(180, 180), validation_split=0.2)
        >>> resilient.fit(model, train, epochs=10, batch_size=32, seed=1)
    """
    try:
        return ImageFolder(
            path=path, image_size=image_size, validation_split=validation_split, labels=labels,
            label_mode=label_mode, class_names=class_names, color_mode=color_mode,
            interpolation=interpolation, seed=seed, cache=cache, follow_links=follow_links,
        )
    except ValidationError as e:
        raise InvalidArgumentError(_describe_validation_error(e, "image_folder")) from None


def _describe_validation_error(error: ValidationError, function: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int))
    cause = first.get("ctx", {}).get("error")
    if cause is not None:
        text = str(cause)
    else:
        msg = str(first.get("msg", "a valid value"))
        msg = msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[:1].lower() + msg[1:]
        text = f"Received: {loc}={first.get('input')!r}. Expected {msg}."
    if not loc:
        return f"Invalid arguments for {function}(). {text}"
    return f"Invalid value for argument `{loc}` of {function}(). {text}"


@runtime_checkable
class DatasetFactory(Protocol):
    """``make_dataset(plan)`` -> a batched ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)``.

    Pass the function itself as ``x`` (or as ``validation_data``). It travels to the worker by value
    (cloudpickle), so a function defined in a notebook or ``__main__`` works; whatever it uses must
    be importable or picklable. The worker calls it once per epoch (and once for validation data),
    so it must batch by ``plan.batch_size`` for ``halve_batch`` to take effect, and may honour
    ``plan.image_size``, ``plan.cache``, ``plan.shuffle_buffer``, ``plan.prefetch`` and
    ``plan.parallel_calls``. If it accepts an ``epoch`` and/or ``seed`` keyword, it receives the epoch
    index and fit's seed: use them to seed the shuffle (``ds.shuffle(n, seed=seed + epoch)``).

    ``resilient.fit`` calls it once in your process with the initial plan to check what it returns
    (a finite, batched dataset whose ``element_spec`` fits the model); no element is read there.

    Resume: the epoch's dataset is re-created and ``offset // plan.batch_size`` batches are skipped
    (``ds.skip``). That is exact only when the factory's order for an epoch is deterministic (no
    unseeded shuffle, no ``reshuffle_each_iteration`` state carried across epochs: seed by ``epoch``)
    and it batches by ``plan.batch_size``; with a different batch size after ``halve_batch`` it stays
    exact when the factory shuffles samples before batching. Otherwise the resumed epoch sees the
    right number of batches but not necessarily the same ones. ``fit``'s ``shuffle`` does not apply.
    """

    def __call__(self, plan: Plan) -> Any: ...
