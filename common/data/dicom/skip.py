"""The one exception of DICOM reading: :class:`DicomSkip`, a file that is not a usable image."""

from __future__ import annotations

__all__ = ["DicomSkip", "first_line"]


class DicomSkip(Exception):  # noqa: N818 (a skip, not an error)
    """A DICOM file that cannot be turned into an image; ``reason`` says why in a few words.

    Parameters
    ----------
    reason : str
        Short human-readable reason, e.g. ``"no Pixel Data element (Modality RTPLAN): not an
        image"``.

    """

    def __init__(self, reason: str) -> None:
        self.reason = reason.strip() or "unusable DICOM file"
        super().__init__(self.reason)


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """Return ``exc`` as one line of at most ``limit`` characters (for a skip reason)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
