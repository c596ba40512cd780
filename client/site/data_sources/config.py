"""Where a site's images are: a DICOM tree with a labels CSV, or a folder of pictures per class.

The site config embeds one :data:`DataSourceConfig` as its ``data`` field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from consilia.common.config import StrictModel
from consilia.common.data.dicom import DEFAULT_MAX_DECODED_MEGABYTES, FramePolicy

__all__ = ["DataSourceConfig", "DataSourceError", "DicomSourceConfig", "ImageFolderSourceConfig"]


class DataSourceError(ValueError):
    """The data source itself is unusable (missing root, bad labels CSV); says what to fix."""


class DicomSourceConfig(StrictModel):
    """A tree of DICOM files plus a CSV that gives each file its label.

    ``labels_csv`` may be absolute or relative to ``root``. With ``key="relative_path"`` the
    CSV's ``path_column`` holds paths relative to ``root`` (forward or back slashes); with
    ``key="sop_instance_uid"`` its ``uid_column`` holds SOP Instance UIDs and the tree is
    scanned for them. Further CSV columns (e.g. ``split``, ``patient_id``) are carried into each
    image's ``meta["csv"]``. ``max_decoded_megabytes`` is the decode limit: a file whose decoded
    pixel data (Rows x Columns x frames x samples x BitsAllocated / 8) would take more is
    skipped, with that reason, before anything is decoded.
    """

    kind: Literal["dicom"] = "dicom"
    root: Path
    labels_csv: Path
    key: Literal["relative_path", "sop_instance_uid"] = "relative_path"
    path_column: str = "path"
    uid_column: str = "sop_instance_uid"
    label_column: str = "label"
    frame_policy: FramePolicy = "middle"
    max_decoded_megabytes: float = Field(
        DEFAULT_MAX_DECODED_MEGABYTES, gt=0, le=65536,
        description="decode limit per file, in MB of decoded pixel data (2**20 bytes)",
    )

    @property
    def labels_path(self) -> Path:
        """The labels CSV, resolved against ``root`` when relative."""
        csv_path = self.labels_csv.expanduser()
        return csv_path if csv_path.is_absolute() else self.root.expanduser() / csv_path

    def describe(self) -> str:
        """One line naming the tree, the CSV and the key."""
        return (
            f"DICOM tree {self.root} (labels {self.labels_path}, keyed by {self.key}, "
            f"{self.frame_policy} frame of multi-frame files)"
        )


class ImageFolderSourceConfig(StrictModel):
    """Ordinary image files in one sub-folder per class: ``root/<class name>/**/<file>``."""

    kind: Literal["image_folder"] = "image_folder"
    root: Path
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg"], min_length=1)

    @field_validator("extensions")
    @classmethod
    def _dotted_lower(cls, value: list[str]) -> list[str]:
        return ["." + ext.lower().lstrip(".") for ext in value]

    def describe(self) -> str:
        """One line naming the folder and the extensions."""
        return f"image folder {self.root} (one sub-folder per class; {', '.join(self.extensions)})"


DataSourceConfig = Annotated[
    DicomSourceConfig | ImageFolderSourceConfig, Field(discriminator="kind")
]
