"""Model weights <-> Flower ``ArrayRecord`` and checkpoint files."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from consilia.common.config import RunConfig
from consilia.common.models import build_model

__all__ = [
    "arrays_from_model",
    "clean_state_dict",
    "load_arrays_into_model",
    "load_checkpoint",
    "model_from_run_config",
    "save_checkpoint",
]

_OPACUS_PREFIX = "_module."


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


def arrays_from_model(model: nn.Module) -> ArrayRecord:
    """Pack a model's (unwrapped) ``state_dict`` into an ``ArrayRecord``."""
    return ArrayRecord(clean_state_dict(_unwrap(model).state_dict()))


def load_arrays_into_model(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` (as produced by :func:`arrays_from_model`) into ``model``."""
    _unwrap(model).load_state_dict(clean_state_dict(arrays.to_torch_state_dict()), strict=True)


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


def save_checkpoint(
    path: Path,
    model: nn.Module,
    run: RunConfig,
    server_round: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint (weights + the config needed to rebuild the model).

    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "consilia-checkpoint-v1",
        "round": server_round,
        "run_config": json.loads(run.model_dump_json()),
        "state_dict": clean_state_dict(_unwrap(model).state_dict()),
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint.

    Returns
    -------
    tuple
        ``(model in eval mode, run config, payload metadata: round and extra)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "consilia-checkpoint-v1":
        raise ValueError(f"{path}: not a Consilia checkpoint (expected consilia-checkpoint-v1)")
    run = RunConfig.model_validate(payload["run_config"])
    model = model_from_run_config(run)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, run, {"round": payload["round"], "extra": payload.get("extra", {})}
