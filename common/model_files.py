"""Model files: weights + description in one ``.safetensors`` file, read without running code.

Every model Consilia writes (round checkpoints, the final global model, the baselines) is one
``.safetensors`` file: the tensors of the model's ``state_dict`` plus, in the file's metadata
header, one JSON document (:class:`ModelFileHeader`) with the run configuration needed to
rebuild the model (model name and kwargs, task: class names, channels, image size), the
round, the layout fingerprint (:func:`consilia.common.serde.layout_digest`) and free-form
``extra`` values.

Why the metadata header and not a JSON sidecar: a model file is handed around on its own
(a hospital receives ``global_model.safetensors`` and runs ``fl-predict`` on it). With the
description inside the same file, the weights can never travel without it, never be paired
with another model's description, and are written atomically with it (one temporary file,
fsync, rename). The header is plain JSON that the safetensors library bounds-checks and
parses; reading it, like reading the tensors, never unpickles anything. Any safetensors tool
shows it (``safetensors.safe_open(path, "pt").metadata()["consilia"]``).

Loading (:func:`load_model_file`) refuses, with one line naming the file and the fix:
pickle-based files (``torch.save``'s ``.pt``: :class:`PickleModelFileError`, checked from the
file's first bytes before anything else reads it), files that are not safetensors, headers that
are not Consilia's, a fingerprint that does not match the model the header describes, tensors
whose names, shapes or dtypes differ from that model, and non-finite weights
(:class:`ModelFileError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from consilia.common.config import RunConfig
from consilia.common.serde import clean_state_dict, layout_digest, model_from_run_config

__all__ = [
    "HEADER_KEY",
    "MODEL_FILE_FORMAT",
    "MODEL_SUFFIX",
    "ModelFileError",
    "ModelFileHeader",
    "PickleModelFileError",
    "load_model_file",
    "pickle_refusal",
    "read_model_header",
    "refuse_pickle_file",
    "save_model_file",
]

#: Suffix of every Consilia model file.
MODEL_SUFFIX = ".safetensors"
#: Version tag of the header document.
MODEL_FILE_FORMAT = "consilia-model-v2"
#: Metadata key of the header document inside the safetensors file.
HEADER_KEY = "consilia"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80  # first byte of a protocol >= 2 pickle (torch.save's legacy format)


class ModelFileError(ValueError):
    """A model file that Consilia refuses to load; the message names the file and the fix."""


class PickleModelFileError(ModelFileError):
    """A pickle-based file (``torch.save``'s ``.pt``) given where a model file is expected."""


class ModelFileHeader(BaseModel):
    """The description stored in a model file's safetensors metadata (key ``consilia``)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["consilia-model-v2"] = "consilia-model-v2"
    round: int = Field(ge=0, description="server round of the weights (0: a baseline)")
    run_config: RunConfig
    layout: str = Field(description="layout fingerprint of the state_dict (serde.layout_digest)")
    extra: dict[str, Any] = Field(default_factory=dict)


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_model_file(
    path: Path,
    model: nn.Module,
    run: RunConfig,
    server_round: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its description as one ``.safetensors`` model file.

    The file is written to a temporary name, flushed to disk and renamed, so a crash never
    leaves a half-written model file behind.

    Parameters
    ----------
    path : Path
        Destination; must end in ``.safetensors``.
    model : torch.nn.Module
        The model (an Opacus wrapper is unwrapped; ``_module.`` prefixes are stripped).
    run : RunConfig
        The run configuration that rebuilds the model (model spec and task).
    server_round : int
        The round the weights come from (0 for baselines).
    extra : dict, optional
        JSON-serialisable values stored with the file (e.g. ``{"baseline": "centralized"}``).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``path`` does not end in ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise ValueError(f"{path}: model files end in {MODEL_SUFFIX}")
    state = clean_state_dict(_unwrap(model).state_dict())
    header = ModelFileHeader(round=server_round, run_config=RunConfig.model_validate(
        json.loads(run.model_dump_json())), layout=layout_digest(state), extra=extra or {})
    # Tied or non-contiguous tensors cannot be stored as they are: each gets its own copy.
    tensors = {name: tensor.contiguous().clone() for name, tensor in state.items()}
    data = safetensors_bytes(tensors, metadata={"format": "pt",
                                                HEADER_KEY: header.model_dump_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def refuse_pickle_file(path: Path) -> None:
    """Raise :class:`PickleModelFileError` when ``path`` holds a pickle (``torch.save``) file.

    Only the first bytes are read: nothing is unpickled.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file opens with its header's length (8 bytes, little-endian), then "{".
    if len(head) == 9 and head[8:] == b"{":
        return
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO]):
        raise pickle_refusal(path)


def pickle_refusal(path: Path) -> PickleModelFileError:
    """Return the one-line refusal of the pickle-based (``.pt``) file ``path``."""
    return PickleModelFileError(
        f"{path} is a pickle-based .pt file; Consilia model files are {MODEL_SUFFIX} "
        "(it was not loaded: loading a pickle can run code) — re-export it with a trusted "
        "Consilia version or retrain")


def read_model_header(path: Path) -> ModelFileHeader:
    """Read a model file's description without loading its weights.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    PickleModelFileError
        If ``path`` is a pickle-based ``.pt`` file.
    ModelFileError
        If ``path`` is not a safetensors file with a Consilia header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    refuse_pickle_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as exc:
        raise ModelFileError(f"{path} is not a {MODEL_SUFFIX} model file ({exc}); give the "
                             "model file a Consilia run wrote") from None
    return _parse_header(path, metadata)


def _parse_header(path: Path, metadata: dict[str, str]) -> ModelFileHeader:
    text = metadata.get(HEADER_KEY)
    if text is None:
        raise ModelFileError(f"{path} has no Consilia description (metadata key "
                             f"'{HEADER_KEY}'); give the model file a Consilia run wrote")
    try:
        return ModelFileHeader.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "header"
        raise ModelFileError(f"{path}: invalid Consilia description at '{where}': "
                             f"{first['msg']}; the file was altered or written by an "
                             f"incompatible version (expected {MODEL_FILE_FORMAT})") from None


def load_model_file(path: Path) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the model stored in a ``.safetensors`` model file, refusing anything suspect.

    The model is built from the header's run configuration; its layout must match both the
    header's fingerprint and the stored tensors (names, shapes, dtypes), and every floating
    weight must be finite.

    Parameters
    ----------
    path : Path
        A model file written by :func:`save_model_file`.

    Returns
    -------
    tuple
        ``(model in eval mode, run config, {"round": int, "extra": dict})``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    PickleModelFileError
        If ``path`` is a pickle-based ``.pt`` file (never unpickled).
    ModelFileError
        If the file is not a Consilia model file, or its weights do not match its description,
        or a weight is not finite.
    """
    path = Path(path)
    header = read_model_header(path)
    run = header.run_config
    try:
        model = model_from_run_config(run)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: cannot build the model its description names "
                             f"({run.model.name}): {exc}") from None
    expected = clean_state_dict(model.state_dict())
    digest = layout_digest(expected)
    if header.layout != digest:
        raise ModelFileError(
            f"{path}: layout fingerprint {header.layout} does not match the model its "
            f"description builds ({run.model.name}, fingerprint {digest}); the file was altered "
            "or its description belongs to another model — use an unmodified model file")
    state = _read_tensors(path, expected)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, run, {"round": header.round, "extra": header.extra}


def _read_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read the tensors of ``path``, checked against ``expected``'s names, shapes and dtypes."""
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        missing = [name for name in expected if name not in names]
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise ModelFileError(
                f"{path}: the stored tensors do not match the model its description builds "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the file was altered "
                "— use an unmodified model file")
        state: dict[str, torch.Tensor] = {}
        for name, like in expected.items():
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != tuple(like.shape):
                raise ModelFileError(f"{path}: tensor '{name}' has shape {shape}, the model "
                                     f"needs {tuple(like.shape)}; the file was altered — use "
                                     "an unmodified model file")
            tensor = handle.get_tensor(name)
            if tensor.dtype != like.dtype:
                raise ModelFileError(f"{path}: tensor '{name}' is {tensor.dtype}, the model "
                                     f"needs {like.dtype}; the file was altered — use an "
                                     "unmodified model file")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelFileError(f"{path}: tensor '{name}' holds NaN or infinite values; "
                                     "refusing a model with non-finite weights")
            state[name] = tensor
    return state
