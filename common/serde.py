"""Model weights <-> Flower ``ArrayRecord``, layout fingerprints, and a run config's model.

Model files on disk are :mod:`consilia.common.model_files`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from consilia.common.config import RunConfig
from consilia.common.models import build_model

__all__ = [
    "PACKED_PREFIX",
    "arrays_from_model",
    "clean_state_dict",
    "layout_digest",
    "load_arrays_into_model",
    "model_from_run_config",
    "pack_state",
    "packed_shapes",
    "unpack_state",
]

_OPACUS_PREFIX = "_module."

#: Key prefix of a packed ``ArrayRecord``: one flat array per dtype,
#: ``packed-float32-<layout digest>`` ...
PACKED_PREFIX = "packed-"


def clean_state_dict(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Strip Opacus' ``_module.`` prefixes so wrapped and plain models exchange the same keys."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        while key.startswith(_OPACUS_PREFIX):
            key = key[len(_OPACUS_PREFIX):]
        out[key] = value.detach().cpu()
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def layout_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Return a short fingerprint of a ``state_dict``'s layout (names, shapes, dtypes, order)."""
    text = ";".join(f"{name}:{tuple(t.shape)}:{_dtype_name(t)}" for name, t in state.items())
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _packed_key(dtype: str, digest: str) -> str:
    return f"{PACKED_PREFIX}{dtype}-{digest}"


def pack_state(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a ``state_dict`` into one flat array per dtype, in the state's key order.

    A model travels between the coordinator and a site as a handful of objects instead of
    two per tensor: Flower moves every array (and every chunk of it) as its own request
    through the SuperLink and the SuperNode, so a model of 14 tensors cost 28 round trips per
    message. Aggregation is unchanged: FedAvg, FedProx, FedAdam and the DP clipping wrapper
    all work elementwise (or on the norm of the whole update), which a flat vector gives the
    same way. The layout (names, shapes) is the model's own ``state_dict`` order, which both
    ends rebuild from the run config; each key carries the layout's fingerprint
    (:func:`layout_digest`), which :func:`unpack_state` checks.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A (clean) ``state_dict``.

    Returns
    -------
    ArrayRecord
        ``{"packed-<dtype>-<layout digest>": flat array}`` for each dtype present.
    """
    digest = layout_digest(state)
    groups: dict[str, list[np.ndarray]] = {}
    for tensor in state.values():
        flat = tensor.detach().cpu().reshape(-1).numpy()
        groups.setdefault(_dtype_name(tensor), []).append(flat)
    return ArrayRecord({_packed_key(name, digest): Array(np.concatenate(parts))
                        for name, parts in groups.items()})


def packed_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of :func:`pack_state`'s record for ``state`` (without packing it)."""
    digest = layout_digest(state)
    sizes: dict[str, int] = {}
    for tensor in state.values():
        key = _packed_key(_dtype_name(tensor), digest)
        sizes[key] = sizes.get(key, 0) + tensor.numel()
    return {key: (size,) for key, size in sizes.items()}


def unpack_state(
    arrays: ArrayRecord, template: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rebuild a ``state_dict`` from :func:`pack_state`'s record, shaped like ``template``.

    A record of named tensors (not packed) is returned as it is, so weights written by other
    tools still load.

    Raises
    ------
    ValueError
        When the record was packed from another layout (a different model).
    """
    if not any(key.startswith(PACKED_PREFIX) for key in arrays.keys()):
        return clean_state_dict(arrays.to_torch_state_dict())
    expected = packed_shapes(template)
    got = {key: tuple(value.shape) for key, value in arrays.items()}
    if got != expected:
        raise ValueError(f"the received weights {got} were packed from another model than this "
                         f"one {expected}: the coordinator and this side built different models "
                         "(check the run's model name, kwargs and task)")
    digest = layout_digest(template)
    flat = {dtype: torch.from_numpy(np.array(arrays[_packed_key(dtype, digest)].numpy()))
            for dtype in {_dtype_name(t) for t in template.values()}}
    offsets = dict.fromkeys(flat, 0)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, like in template.items():
        dtype = _dtype_name(like)
        start = offsets[dtype]
        out[name] = flat[dtype][start:start + like.numel()].view(like.shape)
        offsets[dtype] = start + like.numel()
    return out


def arrays_from_model(model: nn.Module) -> ArrayRecord:
    """Pack a model's (unwrapped) ``state_dict`` into an ``ArrayRecord`` (:func:`pack_state`)."""
    return pack_state(clean_state_dict(_unwrap(model).state_dict()))


def load_arrays_into_model(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` (packed by :func:`arrays_from_model`, or named) into ``model``."""
    inner = _unwrap(model)
    state = unpack_state(arrays, clean_state_dict(inner.state_dict()))
    inner.load_state_dict(state, strict=True)


def model_from_run_config(run: RunConfig) -> nn.Module:
    """Build the run's model from its model config and task spec."""
    if run.task is None:
        raise ValueError("run config has no 'task' (class_names, in_channels, image_size)")
    return build_model(
        run.model.name,
        run.task.in_channels,
        run.task.num_classes,
        run.task.image_size,
        **run.model.kwargs,
    )
