"""The 2D MedMNIST v2 datasets, each registered under its flag (``pneumoniamnist``, ...).

Files are the official ``.npz`` releases (keys ``train_images``, ``train_labels``, ``val_*``,
``test_*``), so the official splits are used. Looked up under the data root, in order:

1. ``<root>/medmnist/<flag>_<cfg.image_size>.npz`` when ``cfg.image_size`` is an official size
   (28 means ``<flag>.npz``), so no resampling is needed;
2. ``<root>/medmnist/<flag>.npz``, then ``<root>/medmnist/<flag>_{64,128,224}.npz``;
3. ``<root>/<flag>.npz`` (the root is the MedMNIST folder itself);
4. ``<root>/medmnist-derived/<flag>*.npz``: non-official copies (the split note says so).

A file named like an official one is checked against the official MD5 (a mismatch is a
warning, not an error; results are cached per path, size and mtime). The class names, URLs and
MD5 values below are those of ``medmnist.INFO`` (medmnist 3.0.2); the ``medmnist`` package is
not a dependency (it pulls scikit-image and creates ``~/.medmnist`` on import).

ChestMNIST is multi-label (14 findings). Policy here: it is binarised to ``no finding`` (all
14 labels 0) vs ``finding`` (any label 1), stated in the bundle's notes. RetinaMNIST is
ordinal (grades 0-4) and is treated as 5-class classification.

MedMNIST is licensed CC BY 4.0: cite Yang et al., *MedMNIST v2*, Scientific Data 10, 41 (2023).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consilia.common.config import DataConfig
from consilia.common.data.datasets.base import (
    DATASETS,
    DatasetBundle,
    DatasetLoader,
    DatasetNotFoundError,
    file_md5,
    square_size,
)
from consilia.common.data.images import ImageData
from consilia.common.paths import default_cache_dir, resolve_data_root

__all__ = [
    "MEDMNIST_FLAGS",
    "MEDMNIST_INFO",
    "MEDMNIST_SIZES",
    "MedMNISTInfo",
    "download_medmnist",
    "find_medmnist_file",
    "load_medmnist",
    "medmnist_url",
]

log = logging.getLogger(__name__)

MEDMNIST_SIZES = (28, 64, 128, 224)
_RECORD_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
_ORGAN = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]  # fmt: skip


@dataclass(frozen=True)
class MedMNISTInfo:
    """Official facts about one MedMNIST flag.

    Parameters
    ----------
    task : str
        Official task type (``multi-class``, ``binary-class``, ``multi-label, binary-class``,
        ``ordinal-regression``).
    in_channels : int
        1 (grey) or 3 (colour).
    labels : tuple of str
        Official class names, index order.
    split_sizes : tuple of int
        Official train/val/test sizes.
    md5 : dict
        Official MD5 per image size (28, 64, 128, 224).

    """

    task: str
    in_channels: int
    labels: tuple[str, ...]
    split_sizes: tuple[int, int, int]
    md5: dict[int, str]


MEDMNIST_INFO: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(
        "multi-class", 3,
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium"),
        (89996, 10004, 7180),
        {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
         128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    ),
    "chestmnist": MedMNISTInfo(
        "multi-label, binary-class", 1,
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
         "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
         "pleural", "hernia"),
        (78468, 11219, 22433),
        {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
         128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    ),
    "dermamnist": MedMNISTInfo(
        "multi-class", 3,
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions"),
        (7007, 1003, 2005),
        {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
         128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    ),
    "octmnist": MedMNISTInfo(
        "multi-class", 1,
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        (97477, 10832, 1000),
        {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
         128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    ),
    "pneumoniamnist": MedMNISTInfo(
        "binary-class", 1, ("normal", "pneumonia"), (4708, 524, 624),
        {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
         128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    ),
    "retinamnist": MedMNISTInfo(
        "ordinal-regression", 3, ("0", "1", "2", "3", "4"), (1080, 120, 400),
        {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
         128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    ),
    "breastmnist": MedMNISTInfo(
        "binary-class", 1, ("malignant", "normal, benign"), (546, 78, 156),
        {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
         128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    ),
    "bloodmnist": MedMNISTInfo(
        "multi-class", 3,
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
         "lymphocyte", "monocyte", "neutrophil", "platelet"),
        (11959, 1712, 3421),
        {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
         128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    ),
    "tissuemnist": MedMNISTInfo(
        "multi-class", 1,
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
         "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
        (165466, 23640, 47280),
        {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
         128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    ),
    "organamnist": MedMNISTInfo(
        "multi-class", 1, tuple(_ORGAN), (34561, 6491, 17778),
        {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
         128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    ),
    "organcmnist": MedMNISTInfo(
        "multi-class", 1, tuple(_ORGAN), (12975, 2392, 8216),
        {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
         128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    ),
    "organsmnist": MedMNISTInfo(
        "multi-class", 1, tuple(_ORGAN), (13932, 2452, 8827),
        {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
         128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    ),
}  # fmt: skip

MEDMNIST_FLAGS: tuple[str, ...] = tuple(MEDMNIST_INFO)

#: Non-official copies whose provenance is documented in shared/data/README.md (section 4).
_KNOWN_DERIVED: dict[str, str] = {
    "f5b994ec7c2fe8bc81ae15cbab7c3df8": (
        "826 of the 1214 normal (class 0) training images removed by the uploader; "
        "val and test equal the official splits"
    ),
    "098de56cd2d92ef2f7170e6153c02849": (
        "re-saved copy with labels flattened to (N,); split sizes and class counts equal "
        "the official ones"
    ),
}

_BINARISED_CHEST = ["no finding", "finding"]


def _official_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_url(flag: str, size: int = 28) -> str:
    """Return the official download URL of ``flag`` at image ``size``."""
    _check_flag(flag)
    return _RECORD_URL.format(name=_official_name(flag, size))


def _check_flag(flag: str) -> MedMNISTInfo:
    if flag not in MEDMNIST_INFO:
        raise ValueError(f"unknown MedMNIST flag '{flag}'; allowed: {', '.join(MEDMNIST_FLAGS)}")
    return MEDMNIST_INFO[flag]


def download_medmnist(flag: str, root: Path, size: int = 28) -> Path:
    """Download the official ``.npz`` of ``flag`` into ``root/medmnist/`` (MD5-checked).

    Parameters
    ----------
    flag : str
        A 2D MedMNIST flag, e.g. ``"pneumoniamnist"``.
    root : Path
        Data root.
    size : int
        Image size: 28, 64, 128 or 224.

    Returns
    -------
    Path
        The downloaded file.

    """
    from torchvision.datasets.utils import download_url

    info = _check_flag(flag)
    if size not in info.md5:
        raise ValueError(f"MedMNIST size {size} does not exist; allowed: {MEDMNIST_SIZES}")
    folder = Path(root).expanduser() / "medmnist"
    name = _official_name(flag, size)
    download_url(medmnist_url(flag, size), str(folder), filename=name, md5=info.md5[size])
    return folder / name


def find_medmnist_file(root: Path, flag: str, image_size: int | None = None) -> Path:
    """Return the first ``.npz`` for ``flag`` under ``root`` (see the module docstring).

    Raises
    ------
    DatasetNotFoundError
        If no candidate exists; the message names every path searched.

    """
    _check_flag(flag)
    folder = root / "medmnist"
    sizes = list(MEDMNIST_SIZES)
    if image_size in sizes:
        sizes.remove(image_size)
        sizes.insert(0, image_size)
    candidates = [folder / _official_name(flag, s) for s in sizes]
    candidates.append(root / _official_name(flag, 28))
    for path in candidates:
        if path.is_file():
            return path
    derived_dir = root / "medmnist-derived"
    derived = sorted(derived_dir.glob(f"{flag}*.npz")) if derived_dir.is_dir() else []
    if derived:
        return derived[0]
    hint = (
        "python -c \"from pathlib import Path; from consilia.common.data.datasets.medmnist import "
        f"download_medmnist; download_medmnist('{flag}', Path('{root}'))\" "
        f"(or fetch {medmnist_url(flag)} into {folder})"
    )
    raise DatasetNotFoundError(flag, [*candidates, derived_dir / f"{flag}*.npz"], hint)


def _official_size_of(path: Path, flag: str) -> int | None:
    for size in MEDMNIST_SIZES:
        if path.name == _official_name(flag, size):
            return size
    return None


def _cached_md5(path: Path) -> str:
    """MD5 of ``path``, remembered per (path, size, mtime) so big files are hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = default_cache_dir() / "datasets" / "md5-cache.json"
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return str(known[key])
    digest = file_md5(path)
    known[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"md5-cache.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.debug("cannot write %s (%s)", cache_file, exc)
    return digest


def _to_nchw(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise ValueError(
        f"{path}: '{key}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)"
    )


def _to_labels(labels: np.ndarray, path: Path, key: str, flag: str) -> np.ndarray:
    labels = np.asarray(labels)
    if flag == "chestmnist":
        if labels.ndim != 2:
            raise ValueError(f"{path}: '{key}' must be (N, 14) multi-label, got {labels.shape}")
        return (labels.max(axis=1) > 0).astype(np.int64)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{path}: '{key}' has shape {labels.shape}; expected (N,) or (N, 1)")
    return labels.astype(np.int64)


def load_medmnist(flag: str, cfg: DataConfig, seed: int) -> DatasetBundle:
    """Load one 2D MedMNIST dataset with its official splits.

    Parameters
    ----------
    flag : str
        The MedMNIST flag, e.g. ``"pneumoniamnist"``.
    cfg : DataConfig
        ``root`` and ``image_size`` (used to prefer a file of that size).
    seed : int
        Unused (the splits are the file's own); kept for the loader interface.

    Returns
    -------
    DatasetBundle
        Images ``(N, C, H, W)`` uint8 and ``int64`` labels per split.

    Raises
    ------
    DatasetNotFoundError
        If no file is found.
    ValueError
        If a key is missing or an array has an unexpected shape/dtype or label range.

    """
    del seed
    info = _check_flag(flag)
    root = resolve_data_root(cfg.root)
    path = find_medmnist_file(root, flag, cfg.image_size)
    notes: list[str] = []
    official_size = _official_size_of(path, flag)
    if official_size is not None:
        digest = _cached_md5(path)
        if digest != info.md5[official_size]:
            message = (
                f"{path}: MD5 {digest} differs from the official MedMNIST value "
                f"{info.md5[official_size]}; results may not be comparable with the paper"
            )
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        split_note = f"official MedMNIST v2 split ({path.name})"
        official = True
    else:
        digest = _cached_md5(path)
        detail = _KNOWN_DERIVED.get(digest, "provenance unknown")
        split_note = (
            f"split as stored in the derived, non-official file {path.parent.name}/{path.name} "
            f"(md5 {digest}): {detail}"
        )
        official = False

    class_names = _BINARISED_CHEST if flag == "chestmnist" else list(info.labels)
    if flag == "chestmnist":
        notes.append(
            "chestmnist is multi-label: binarised to 'no finding' (all 14 labels 0) vs "
            "'finding' (any label 1)"
        )
    splits: dict[str, ImageData] = {}
    with np.load(path, allow_pickle=False) as data:
        needed = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        missing = [k for k in needed if k not in data.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {missing}; a MedMNIST file has {needed}"
            )
        for split in ("train", "val", "test"):
            images = _to_nchw(data[f"{split}_images"], path, f"{split}_images")
            labels = _to_labels(data[f"{split}_labels"], path, f"{split}_labels", flag)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"{path}: {split}_labels has {labels.shape[0]} rows for "
                    f"{images.shape[0]} images"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise ValueError(
                    f"{path}: {split}_labels outside 0..{len(class_names) - 1} "
                    f"({len(class_names)} classes for {flag})"
                )
            splits[split] = ImageData(images, labels)

    in_channels = int(splits["train"].images.shape[1])
    return DatasetBundle(
        name=flag,
        class_names=class_names,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        in_channels=in_channels,
        image_size=square_size(splits["train"].images, path),
        official_split=official,
        split_note=split_note,
        source=path,
        notes=notes,
    )


def _make_loader(flag: str) -> DatasetLoader:
    def loader(cfg: DataConfig, seed: int) -> DatasetBundle:
        return load_medmnist(flag, cfg, seed)

    loader.__name__ = f"load_{flag}"
    loader.__doc__ = f"Load MedMNIST '{flag}' (official splits); see :func:`load_medmnist`."
    return loader


for _flag in MEDMNIST_FLAGS:
    DATASETS.register(_flag, _make_loader(_flag))
