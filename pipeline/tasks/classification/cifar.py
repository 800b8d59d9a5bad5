"""CIFAR-10/100 as the official python archives hold them: finding the extracted folder (downloading it when asked),
and reading its pickled batches safely into one uint8 image array, labels and class names."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import safe_pickle
from pipeline.errors import UserError

_CIFAR_LAYOUT = {
    # fmt: (folder name, train files, test files, meta file, label key, class-names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


# numpy's own pickling helpers, taken from what an array reduces to, because their module moved in numpy 2
# (numpy.core -> numpy._core) and importing the old path warns.
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce_ex__(2)[0]
_NUMPY_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]


# What CIFAR files hold besides dicts, lists, bytes, str and ints: numpy arrays (under numpy 1's and numpy 2's module
# names, for files re-saved with newer numpy), and for Python 3 protocol-2 files codecs.encode for bytes.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **safe_pickle.CODECS_ENCODE,
}


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle file as a dict with str keys, read without running any code the file names."""
    if not path.is_file():
        raise UserError(f"CIFAR file '{path}' is missing; re-extract the archive or set data.download: true")
    # latin1 is how Python 3 must read the Python 2 strings of the original files (numpy data included).
    content = safe_pickle.load(path, allowed=_CIFAR_GLOBALS, encoding="latin1", what=f"CIFAR file '{path}'",
                               remedy="re-download the official files")
    if not isinstance(content, dict):
        raise UserError(f"CIFAR file '{path}' holds a {type(content).__name__}, expected a dict; re-download it")
    return {_text(key): value for key, value in content.items()}


def load_cifar(folder: Path, fmt: str, *, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 32, 32, 3) uint8, labels (N,) int64 and class names of one CIFAR split."""
    _, train_files, test_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[fmt]
    meta = read_cifar_pickle(folder / meta_file)
    if names_key not in meta:
        raise UserError(f"CIFAR file '{folder / meta_file}' has no '{names_key}'; is this {fmt}? check data.format")
    classes = [_text(name) for name in meta[names_key]]
    images, labels = [], []
    for name in train_files if train else test_files:
        batch_images, batch_labels = _read_batch(folder / name, label_key, len(classes))
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels), classes


def cifar_files(folder: Path, fmt: str, *, train: bool) -> list[Path]:
    """The files `load_cifar` reads for one split: the class list, then the batches."""
    _, train_files, test_files, meta_file, _, _ = _CIFAR_LAYOUT[fmt]
    return [folder / name for name in (meta_file, *(train_files if train else test_files))]


def folder_problem(root: Path, fmt: str) -> str | None:
    """Why there is no extracted `fmt` archive at `root` (None: there is one)."""
    folder_name = _CIFAR_LAYOUT[fmt][0]
    if (root.name == folder_name and root.is_dir()) or (root / folder_name).is_dir():
        return None
    return (f"data.root: {fmt} is not at {(root / folder_name).resolve()}; extract the official "
            f"python archive ({folder_name}/data_batch_1 ...) into {root.resolve()}, point data.root "
            f"at the folder that holds it, or set data.download: true to fetch it")


def find_cifar_folder(root: Path, fmt: str, *, download: bool) -> Path:
    """The extracted CIFAR folder: root itself, or root/<official folder name> (downloaded there if asked)."""
    if fmt not in _CIFAR_LAYOUT:
        raise UserError(f"data.format: unknown CIFAR format '{fmt}'; use cifar10 or cifar100")
    folder_name = _CIFAR_LAYOUT[fmt][0]
    if root.name == folder_name and root.is_dir():
        return root
    if not (root / folder_name).is_dir():
        if not download:
            raise UserError(folder_problem(root, fmt))
        _download_cifar(root, fmt)
    return root / folder_name


def _download_cifar(root: Path, fmt: str) -> None:
    # torchvision knows the official URL and checksum; only its downloader is used, never its unrestricted loader.
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    source = CIFAR10 if fmt == "cifar10" else CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)
    except (OSError, RuntimeError) as err:
        raise UserError(f"data.download: could not fetch {fmt} from {source.url} ({err}); check the network or "
                        f"download and extract it into '{root}' yourself") from err


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"CIFAR file '{path}' has no uint8 'data' array of shape (N, 3072); re-download it")
    if labels is None or len(labels) != len(data):
        raise UserError(f"CIFAR file '{path}' has no '{label_key}' list matching its {len(data)} images; "
                        "check data.format (cifar10 or cifar100)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"CIFAR file '{path}' has labels outside 0..{num_classes - 1}; check data.format")
    # Rows are stored channel-planar (1024 red, 1024 green, 1024 blue values); albumentations wants HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value
