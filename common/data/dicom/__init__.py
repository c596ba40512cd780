"""DICOM file -> normalised image array, with a clear reason for every file that is not usable.

Modules, one concept each: ``skip`` (:class:`DicomSkip`), ``dataset`` (reading a file, deflate
bound), ``header`` (header checks, :func:`inspect_dicom`), ``size_guard`` (geometry and the
decode limit, checked before any decode), ``frames`` (frame policy, per-frame LUT view),
``decode`` (pixel decoding), ``normalise`` (modality LUT, VOI LUT / window, robust range,
colour) and ``reader`` (:func:`read_dicom`).

Anything not usable raises :class:`DicomSkip` with a short reason (no pixel data, no transfer
syntax, truncated file or pixel data, impossible geometry, decoded size over the limit,
undecodable codestream, unsupported photometric interpretation, unusable rescale or window,
constant image, ...). :func:`read_dicom` never raises anything else for a file.
"""

from consilia.common.data.dicom.dataset import is_probably_dicom
from consilia.common.data.dicom.frames import FRAME_POLICIES, FramePolicy
from consilia.common.data.dicom.header import inspect_dicom
from consilia.common.data.dicom.reader import DicomImage, read_dicom
from consilia.common.data.dicom.size_guard import DEFAULT_MAX_DECODED_MEGABYTES
from consilia.common.data.dicom.skip import DicomSkip

__all__ = [
    "DEFAULT_MAX_DECODED_MEGABYTES",
    "FRAME_POLICIES",
    "DicomImage",
    "DicomSkip",
    "FramePolicy",
    "inspect_dicom",
    "is_probably_dicom",
    "read_dicom",
]
