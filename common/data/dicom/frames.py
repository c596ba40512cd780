"""Frame selection of multi-frame objects, and the per-frame view of the LUT elements.

Policies: ``"middle"`` (default; frame ``n // 2``), ``"first"``, or ``"mean"`` (every frame
through the pipeline, then the per-pixel mean). Enhanced multi-frame objects (Enhanced CT, MR,
XA) keep Rescale and Window in their functional groups; :func:`frame_view` gathers the values
that apply to one frame.
"""

from __future__ import annotations

from typing import Literal

from pydicom.dataset import Dataset

__all__ = ["FRAME_POLICIES", "FramePolicy", "frame_indices", "frame_view"]

FramePolicy = Literal["middle", "first", "mean"]
FRAME_POLICIES: tuple[str, ...] = ("middle", "first", "mean")

# Elements the LUT functions read; copied into a per-frame view.
_VIEW_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FRAME_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def frame_indices(n_frames: int, policy: str) -> list[int] | None:
    """Return the frames to decode for ``policy``; ``None`` means every frame (``"mean"``)."""
    if n_frames <= 1:
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    if policy == "first":
        return [0]
    return None  # mean: all frames


def frame_view(ds: Dataset, index: int) -> Dataset:
    """Return a small dataset with the LUT-relevant elements that apply to frame ``index``.

    Top-level elements first, then the Shared and this frame's Per-frame Functional Groups
    (Enhanced CT/MR/XA objects keep Rescale and Window there).
    """
    view = Dataset()
    if getattr(ds, "file_meta", None) is not None:
        view.file_meta = ds.file_meta
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        view.set_original_encoding(implicit, little, ds.original_character_set)
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups: list[Dataset] = []
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and index < len(per_frame):
            groups.append(per_frame[index])
    except Exception:  # malformed functional groups: keep the top-level values
        groups = []
    for group in groups:
        for sequence in _FRAME_GROUP_SEQUENCES:
            items = group.get(sequence)
            if not items:
                continue
            for element in items[0]:
                if element.keyword in _VIEW_KEYWORDS:
                    view[element.tag] = element
    return view
