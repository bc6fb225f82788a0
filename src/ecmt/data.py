"""Dataset loading for the ECMT command-line tools.

The datasets used by the project (Fashion-MNIST and MNIST) are stored in the
IDX format. This module reads IDX files directly (gzip-compressed or plain) so
that no network access is needed when the files are installed locally, e.g. by
the Debian package ``dataset-fashion-mnist``.

Search order for the files of a dataset:

1. the ``root`` argument, when given;
2. the directory named by the ``ECMT_DATA_DIR`` environment variable (both the
   directory itself and its ``<name>`` subdirectory are tried);
3. the system location ``/usr/share/datasets/<name>``;
4. a previous ``download=True`` (``ecmt --download``) in ``~/.cache/ecmt``.

The network is never reached without ``download=True``: if no files are found, a
:class:`FileNotFoundError` lists every path searched and the ways to get the files that
exist (the Debian package ``dataset-fashion-mnist``; MNIST has no Debian package). With
``download=True``, torchvision's downloader fetches them into ``~/.cache/ecmt``.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "EvalData",
    "IdxDataset",
    "candidate_roots",
    "find_idx_file",
    "load_idx_dataset",
    "load_raw_split",
    "normalize_images",
    "open_dataset",
    "read_idx",
]

#: Per-dataset metadata: system directory, Debian package, torchvision class
#: name and the per-channel mean/std of the training images (pixels in [0, 1]).
DATASETS: dict[str, dict] = {
    "fashion-mnist": {
        "system_dir": "/usr/share/datasets/fashion-mnist",
        "debian_package": "dataset-fashion-mnist",
        "torchvision_class": "FashionMNIST",
        "mean": (0.2860,),
        "std": (0.3530,),
    },
    "mnist": {
        "system_dir": "/usr/share/datasets/mnist",
        "debian_package": None,  # Debian packages Fashion-MNIST only
        "torchvision_class": "MNIST",
        "mean": (0.1307,),
        "std": (0.3081,),
    },
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into a numpy array.

    The IDX header is a big-endian magic number ``0x0000TTDD`` (``TT`` is the
    element type code, ``DD`` the number of dimensions) followed by one
    big-endian ``uint32`` per dimension, then the raw data.

    Args:
        path: Path to the file. Files ending in ``.gz`` are decompressed.

    Returns:
        Array with the shape stored in the header, in native byte order.

    Raises:
        ValueError: If the header is malformed or the data size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    dtype = _IDX_DTYPES[type_code]
    header_len = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise ValueError(
            f"{path}: expected {expected} data bytes for shape {shape}, "
            f"found {len(raw) - header_len}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def candidate_roots(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Lists the directories searched for the IDX files of a dataset.

    Args:
        name: Dataset name, a key of :data:`DATASETS`.
        root: Optional directory given by the caller; searched first.

    Returns:
        Directories in search order (duplicates removed).
    """
    roots: list[Path] = []
    if root is not None:
        roots += [Path(root), Path(root) / name]
    env_dir = os.environ.get("ECMT_DATA_DIR")
    if env_dir:
        roots += [Path(env_dir), Path(env_dir) / name]
    roots.append(Path(DATASETS[name]["system_dir"]))
    roots.append(DOWNLOAD_DIR / DATASETS[name]["torchvision_class"] / "raw")  # where download=True puts them
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def find_idx_file(roots: Sequence[Path], stem: str) -> Path | None:
    """Finds ``<stem>`` or ``<stem>.gz`` in the first root that has it.

    Args:
        roots: Directories to search, in order.
        stem: File name without the ``.gz`` suffix,
            e.g. ``"train-images-idx3-ubyte"``.

    Returns:
        The path found, or ``None``.
    """
    for r in roots:
        for fname in (stem, stem + ".gz"):
            p = r / fname
            if p.is_file():
                return p
    return None


DOWNLOAD_DIR = Path.home() / ".cache" / "ecmt"
"""Where ``download=True`` (``ecmt --download``) puts Fashion-MNIST and MNIST."""


def _load_with_torchvision(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Downloads a dataset with torchvision into ``~/.cache/ecmt``.

    Args:
        name: Dataset name, a key of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)`` as in :func:`load_raw_split`.
    """
    import torchvision  # imported lazily: only needed for the fallback

    cls = getattr(torchvision.datasets, DATASETS[name]["torchvision_class"])
    ds = cls(str(DOWNLOAD_DIR), train=(split == "train"), download=True)
    images = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
    labels = ds.targets.to(torch.int64)
    return images, labels


def load_raw_split(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split of a dataset as raw tensors.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        root: Optional directory holding the IDX files (searched first).
        download: Fetch the files with torchvision into ``~/.cache/ecmt`` when they are not
            found locally (network). Without it the network is never used.

    Returns:
        ``(images, labels)``: ``uint8`` images of shape ``[N, 1, 28, 28]`` and
        ``int64`` labels of shape ``[N]``.

    Raises:
        ValueError: If ``name`` or ``split`` is unknown.
        FileNotFoundError: If the files are not found locally (and, with ``download``, the
            download failed).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    prefix = _SPLIT_PREFIX[split]
    roots = candidate_roots(name, root)
    img_path = find_idx_file(roots, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx_file(roots, f"{prefix}-labels-idx1-ubyte")
    if img_path is not None and lbl_path is not None:
        images = torch.from_numpy(read_idx(img_path).astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{img_path} has {images.shape[0]} images but "
                f"{lbl_path} has {labels.shape[0]} labels"
            )
        return images.contiguous(), labels
    searched = ", ".join(str(r) for r in roots)
    if not download:
        package = DATASETS[name]["debian_package"]
        ways = [f"install the Debian package {package} (apt-get install {package})"] if package else []
        ways += [f"put {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] in --data-root DIR or "
                 "ECMT_DATA_DIR", f"add --download to fetch them with torchvision into {DOWNLOAD_DIR} (network)"]
        raise FileNotFoundError(f"{name} ({split}) IDX files not found (searched {searched}): "
                                + "; or ".join(ways))
    try:
        return _load_with_torchvision(name, split)
    except Exception as exc:  # network errors, missing torchvision, ...
        raise FileNotFoundError(
            f"{name} ({split}) IDX files not found (searched {searched}) and the download into "
            f"{DOWNLOAD_DIR} failed: {exc}"
        ) from exc


def normalize_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Converts ``uint8`` images to normalized floats.

    Args:
        images: ``uint8`` tensor of shape ``[..., C, H, W]``.
        mean: Per-channel mean of the pixel values in ``[0, 1]``.
        std: Per-channel standard deviation of the pixel values in ``[0, 1]``.

    Returns:
        ``float32`` tensor ``(images / 255 - mean) / std``.
    """
    x = images.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


class IdxDataset(Dataset):
    """An in-memory image dataset that normalizes samples lazily.

    Images are kept as ``uint8`` (``[N, 1, 28, 28]``); each item is converted
    to a normalized ``float32`` tensor on access, then passed through the
    optional ``transform``.

    Attributes:
        images: ``uint8`` tensor ``[N, 1, 28, 28]``.
        labels: ``int64`` tensor ``[N]``.
        mean: Per-channel normalization mean.
        std: Per-channel normalization standard deviation.
        transform: Optional callable applied to each normalized image.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Initializes the dataset.

        Args:
            images: ``uint8`` tensor ``[N, C, H, W]``.
            labels: ``int64`` tensor ``[N]``.
            mean: Per-channel normalization mean.
            std: Per-channel normalization standard deviation.
            transform: Optional callable applied to each normalized image.
        """
        self.images = images
        self.labels = labels
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.transform = transform

    def __len__(self) -> int:
        """Returns the number of samples."""
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(normalized_image, label)`` for one sample."""
        x = normalize_images(self.images[index], self.mean, self.std)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns all samples at once as ``(normalized_images, labels)``.

        Handy for fast batched evaluation without a DataLoader; the
        ``transform`` is not applied.
        """
        return normalize_images(self.images, self.mean, self.std), self.labels


def load_idx_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    download: bool = False,
) -> IdxDataset:
    """Loads a dataset split as an :class:`IdxDataset`.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        root: Optional directory holding the IDX files (searched first).
        mean: Normalization mean; defaults to the dataset's training mean.
        std: Normalization std; defaults to the dataset's training std.
        transform: Optional callable applied to each normalized image.
        download: See :func:`load_raw_split`.

    Returns:
        The dataset; items are ``(float32 [1, 28, 28], int64 label)``.

    Raises:
        ValueError: If ``name`` or ``split`` is unknown.
        FileNotFoundError: If the dataset files cannot be found or downloaded.
    """
    images, labels = load_raw_split(name, split, root, download)
    info = DATASETS[name]
    return IdxDataset(
        images,
        labels,
        mean if mean is not None else info["mean"],
        std if std is not None else info["std"],
        transform,
    )


# --------------------------------------------------------------------------- evaluation sets


@dataclass(frozen=True)
class EvalData:
    """A dataset opened for evaluating a model: the evaluation split and the calibration data.

    Attributes:
        name: The dataset name, or the image folder's path.
        test: The evaluated samples, items ``(image tensor, int label)``.
        calibration: Where calibration images are drawn from: the training split when the
            dataset has one, else the evaluation set itself.
        calibration_source: ``"train split"`` or ``"evaluation set"``.
        num_classes: Number of classes.
    """

    name: str
    test: Dataset
    calibration: Dataset
    calibration_source: str
    num_classes: int


def open_dataset(name: str, data_config: Mapping[str, Any], num_classes: int,
                 root: str | os.PathLike | None = None, *, class_map: str | os.PathLike | None = None,
                 download: bool = False) -> EvalData:
    """Opens a dataset by name, or an image folder by path, preprocessed for a model.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"`` (IDX files, see :func:`load_raw_split`), or a
            directory in ImageNet validation layout: one subdirectory of images per class,
            classes numbered in sorted order of their names; or, for a 1000-class model whose
            directories are all ImageNet WordNet ids (``n01440764``, ...), by their ImageNet
            index, so that a subset of ImageNet val works.
        data_config: The model's preprocessing (``input_size``, ``mean``, ``std``, and for
            image folders ``interpolation``, ``crop_pct``, ``crop_mode``), as in
            :class:`ecmt.models.ModelBundle`.
        num_classes: The model's number of classes; the dataset must have as many.
        root: Directory holding the IDX files (searched first).
        class_map: Image folders: a file giving the model's class index of each directory
            (see :func:`read_class_map`), instead of their sorted order.
        download: Fashion-MNIST and MNIST: fetch the files when not found (see
            :func:`load_raw_split`).

    Raises:
        DatasetError: Unknown name, missing or empty data, or data that does not fit the model.

    Example:
        >>> from ecmt.models import load_model
        >>> bundle = load_model("fmnist-vit")
        >>> data = open_dataset("fashion-mnist", bundle.data_config, bundle.num_classes)   # doctest: +SKIP
        >>> len(data.test), data.calibration_source                                         # doctest: +SKIP
        (10000, 'train split')
    """
    from .errors import DatasetError

    if name in DATASETS:
        if class_map is not None:
            raise DatasetError(f"--class-map is for image folders; {name} has its own labels")
        return _open_idx(name, data_config, num_classes, root, download)
    if Path(name).is_dir():
        return _open_folder(Path(name), data_config, num_classes, class_map)
    reason = "a file, not a directory" if Path(name).exists() else "no such dataset or directory"
    raise DatasetError(f"unknown dataset {name!r} ({reason}): give one of {', '.join(sorted(DATASETS))} "
                       "or a directory of class subdirectories (ImageNet val layout)")


def _open_idx(name: str, data_config: Mapping[str, Any], num_classes: int,
              root: str | os.PathLike | None, download: bool = False) -> EvalData:
    from .errors import DatasetError

    size = tuple(data_config["input_size"])
    if size != (1, 28, 28):
        raise DatasetError(f"{name} images are 1x28x28 but the model expects {'x'.join(map(str, size))}")
    splits = {}
    for split in ("test", "train"):
        try:
            splits[split] = load_idx_dataset(name, split, root, data_config["mean"], data_config["std"],
                                             download=download)
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(" ".join(str(e).split())) from None
    if len(splits["test"]) == 0:
        raise DatasetError(f"{name}: the test split holds no images; check its IDX files")
    classes = int(splits["test"].labels.max()) + 1
    if classes != num_classes:
        raise DatasetError(f"{name} has {classes} classes but the model predicts {num_classes}")
    return EvalData(name, splits["test"], splits["train"], "train split", classes)


SKIPPED = -1
"""The label of an image that could not be read: evaluation and calibration leave it out and count it
as skipped (:attr:`ecmt.evaluation.Tally.skipped`), never as correct or wrong."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(file, class index)`` of an ImageNet-val-style folder, in sorted order.

    Class directories are the subdirectories of ``root``; below them, files with an image
    extension at any depth. Symbolic links to directories are not followed (a link loop
    cannot count one image twice); links to files are listed, and dangling ones are skipped
    when read, like any unreadable image.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for folder, dirs, files in os.walk(root / name, followlinks=False):
            dirs.sort()
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


class ImageFiles(Dataset):
    """Images of an ImageNet-val-style folder; an image that cannot be read comes as ``(zeros, SKIPPED)``.

    Skipping is decided by the file alone (it is opened, checked against Pillow's decompression
    bomb limit, and decoded), so every run, resumed or not, skips the same files.
    """

    def __init__(self, root: Path, transform: Callable[[Any], torch.Tensor], mode: str,
                 input_size: Sequence[int]) -> None:
        self.classes, self.samples = image_files(root)
        self.transform, self.mode, self.input_size = transform, mode, tuple(input_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import warnings

        from PIL import Image

        file, label = self.samples[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with open(file, "rb") as f:
                    image = Image.open(f)
                    image.load()
                    image = image.convert(self.mode)
            return self.transform(image), label
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            print(f"ecmt: warning: skipping unreadable image {file} ({reason[:200]})", file=sys.stderr, flush=True)
            return torch.zeros(self.input_size), SKIPPED


def _open_folder(path: Path, data_config: Mapping[str, Any], num_classes: int,
                 class_map: str | os.PathLike | None = None) -> EvalData:
    from timm.data import create_transform

    from .errors import DatasetError

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    transform = create_transform(**{k: data_config[k] for k in keys if k in data_config}, is_training=False)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    try:
        ds = ImageFiles(path, transform, mode, data_config["input_size"])
    except OSError as e:
        raise DatasetError(f"{path}: {' '.join(str(e).split())} (expected ImageNet val layout: one "
                           "subdirectory of images per class)") from None
    if not ds.classes:
        raise DatasetError(f"{path} has no class directories (expected ImageNet val layout: one subdirectory "
                           "of images per class)")
    if not ds.samples:
        raise DatasetError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class directories")
    mapping = read_class_map(class_map) if class_map is not None else None
    if mapping is None and len(ds.classes) != num_classes and num_classes == IMAGENET_CLASSES:
        mapping = imagenet_class_map(ds.classes)
    if mapping is None:
        if len(ds.classes) != num_classes:
            raise DatasetError(f"{path} has {len(ds.classes)} class directories but the model predicts "
                               f"{num_classes} classes (expected ImageNet val layout: one directory per class; "
                               "give the model's class index of each directory with --class-map FILE)")
        return EvalData(str(path), ds, ds, "evaluation set", num_classes)
    missing = [c for c in ds.classes if c not in mapping]
    if missing:
        raise DatasetError(f"{path}: the class map gives no class index for {len(missing)} director"
                           f"{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing[:5])}")
    bad = sorted({mapping[c] for c in ds.classes if not 0 <= mapping[c] < num_classes})
    if bad:
        raise DatasetError(f"{path}: the class map gives indices outside 0..{num_classes - 1}: {bad[:5]}")
    index = [mapping[c] for c in ds.classes]  # ImageFolder's label -> the model's class index
    ds.samples = [(file, index[t]) for file, t in ds.samples]
    return EvalData(str(path), ds, ds, "evaluation set", num_classes)


IMAGENET_CLASSES = 1000


def imagenet_class_map(directories: Sequence[str]) -> dict[str, int] | None:
    """The ImageNet-1k class index of each directory named by its WordNet id, or None.

    The index is the position of the WordNet id in the sorted list of the 1000 ImageNet-1k
    ids (timm's ``imagenet_synsets.txt``): the order every ImageNet classifier is trained
    in. None when a directory is not one of those ids.
    """
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo("imagenet-1k").label_names()
    index = {s: i for i, s in enumerate(synsets)}
    return {d: index[d] for d in directories} if all(d in index for d in directories) else None


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a class map: directory name -> the model's class index.

    Formats: a JSON object ``{"dir": index}``; or text, one class per line, either
    ``dir index`` or ``dir`` alone (then its line number, from 0, is its index, as in
    timm's ``imagenet_synsets.txt``). Blank lines and lines starting with ``#`` are skipped.

    Raises:
        DatasetError: The file is missing or malformed.
    """
    import json

    from .errors import DatasetError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read class map {path}: {' '.join(str(e).split())}") from None
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
            return {str(k): int(v) for k, v in mapping.items()}
        except (ValueError, TypeError, AttributeError):
            raise DatasetError(f"class map {path}: expected a JSON object of directory -> class index") from None
    mapping, position = {}, 0
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise DatasetError(f"class map {path}, line {number}: expected 'dir' or 'dir index', got {line.strip()!r}")
        mapping[fields[0]] = int(fields[1]) if len(fields) == 2 else position
        position += 1
    if not mapping:
        raise DatasetError(f"class map {path} is empty")
    return mapping
