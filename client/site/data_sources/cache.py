"""The decoded-image cache: preprocessed images keyed by file content and parameters."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from consilia.client.site.data_sources.report import DataReport

__all__ = ["CACHE_VERSION", "DecodedImageCache", "file_sha256", "pipeline_signature"]

CACHE_VERSION = 2  # 2: bounded decoding; constant images and unusable LUT values skipped


def pipeline_signature() -> str:
    """Cache-key part that changes when the decoding code or decoder versions change."""
    versions = []
    for package in ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pillow"):
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return f"v{CACHE_VERSION};" + ";".join(versions)


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's bytes (the cache key's content part)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class DecodedImageCache:
    """Preprocessed images on disk, one small ``.npz`` per (file content, parameters)."""

    def __init__(self, cache_dir: Path, params: str, report: DataReport) -> None:
        self.params = hashlib.sha256(f"{params};{pipeline_signature()}".encode()).hexdigest()[:16]
        self.dir: Path | None = Path(cache_dir).expanduser() / "site-data"
        self.report = report
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            report.notes.append(f"cache folder {self.dir} not usable ({exc}); nothing cached")
            self.dir = None

    def _file(self, digest: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / digest[:2] / f"{digest}-{self.params}.npz"

    def get(self, digest: str) -> tuple[np.ndarray, dict[str, Any]] | str | None:
        """Return ``(image, meta)``, a cached skip reason, or None on a miss."""
        path = self._file(digest)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "reason" in data.files:
                    return str(data["reason"])
                return data["image"], json.loads(str(data["meta"]))
        except Exception:  # a damaged cache entry is just a miss
            return None

    def put(
        self, digest: str, image: np.ndarray | None, meta: dict | None, reason: str = ""
    ) -> None:
        """Store a preprocessed image (or a skip reason) atomically."""
        path = self._file(digest)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            if image is None:
                np.savez(tmp, reason=np.array(reason))
            else:
                np.savez(tmp, image=image, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except OSError as exc:
            self.report.notes.append(f"cache write failed ({exc}); continuing without it")
            self.dir = None
