"""Cost of one DP-SGD step vs a plain step: time and peak memory, per model and mode."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["format_cost", "measure_default_overhead", "measure_step_cost", "run_cost"]

log = logging.getLogger("consilia.privacy_bench")


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else None


def _peak_rss_mib(fn: Callable[[], None]) -> float | None:
    """Run ``fn``; return the peak resident-memory increase in MiB (Linux ``VmHWM``)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        base = None
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


def measure_step_cost(
    model_name: str, mode: str | None, image_size: int = 32, batch: int = 32,
    steps: int = 3, num_classes: int = 6,
) -> dict[str, Any]:
    """Median time and peak memory of one (DP-)SGD step; ``mode=None`` is non-private.

    Parameters
    ----------
    model_name : str
        A registered model.
    mode : str or None
        Opacus grad-sample mode, or None for a plain step.
    image_size, batch, steps, num_classes
        Input geometry, batch size, timed steps (after one warm-up step).

    Returns
    -------
    dict
        ``ms`` (median), ``peak_mib`` (RSS increase over the timed steps) or ``error``.

    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from consilia.client.privacy.dpsgd import enable_fast_dp_step
    from consilia.common.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, 1, num_classes, image_size)
    data = TensorDataset(torch.rand(batch * (steps + 1), 1, image_size, image_size),
                         torch.randint(0, num_classes, (batch * (steps + 1),)))
    loader = DataLoader(data, batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: Any = torch.nn.CrossEntropyLoss()
    try:
        if mode is not None:
            engine = PrivacyEngine(accountant="rdp")
            kwargs = {"criterion": criterion} if mode == "ghost" else {}
            out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                      noise_multiplier=1.0, max_grad_norm=1.0,
                                      poisson_sampling=False, grad_sample_mode=mode, **kwargs)
            if mode == "ghost":
                model, optimizer, criterion, loader = out
            else:
                model, optimizer, loader = out
            enable_fast_dp_step(model, mode)  # as PrivacyController.make_private does
        model.train()
        batches = list(loader)
        times: list[float] = []

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), labels).backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)

        step(*batches[0])  # warm-up
        times.clear()
        peak = _peak_rss_mib(lambda: [step(*b) for b in batches[1:steps + 1]])
        return {"ms": 1000 * statistics.median(times), "peak_mib": peak}
    except Exception as exc:  # noqa: BLE001 - an unsupported mode is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def measure_default_overhead(
    mode: str, image_size: int, batch: int, steps: int,
    model_kwargs: dict[str, Any] | None = None, model_name: str = "cnn",
) -> dict[str, Any]:
    """Interleaved A/B timing of plain vs DP-SGD steps of one model (robust to load drift).

    The plain and the private model step alternately on the same batch, so a busy shared
    machine slows both alike; returns both medians (ms) and their ratio. The private path
    is the project's (:func:`consilia.client.privacy.dpsgd.enable_fast_dp_step`, as in
    ``PrivacyController.make_private``).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from consilia.client.privacy.dpsgd import enable_fast_dp_step
    from consilia.common.models import build_model

    torch.manual_seed(0)
    kwargs = dict(model_kwargs or {})
    images = torch.rand(batch, 1, image_size, image_size)
    labels = torch.randint(0, 6, (batch,))
    plain = build_model(model_name, 1, 6, image_size, **kwargs).train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    inner = build_model(model_name, 1, 6, image_size, **kwargs)
    private, private_opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=inner, optimizer=torch.optim.SGD(inner.parameters(), lr=0.01),
        data_loader=DataLoader(TensorDataset(images, labels), batch_size=batch),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
    enable_fast_dp_step(private, mode)
    private.train()
    loss = torch.nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {"plain": [], "private": []}
    pairs = (("plain", plain, plain_opt), ("private", private, private_opt))
    for i in range(steps + 1):
        for name, model, opt in pairs if i % 2 else pairs[::-1]:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss(model(images), labels).backward()
            opt.step()
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    plain_ms = 1000 * statistics.median(times["plain"])
    private_ms = 1000 * statistics.median(times["private"])
    return {"model": model_name, "kwargs": kwargs, "mode": mode, "image_size": image_size,
            "batch": batch, "steps": steps, "plain_ms": plain_ms, "private_ms": private_ms,
            "ratio": private_ms / plain_ms}


def run_cost(models: Sequence[str], modes: Sequence[str], image_size: int, batch: int,
             steps: int) -> list[dict[str, Any]]:
    """Measure every model non-private and in every mode; return one row per model."""
    rows = []
    for name in models:
        plain = measure_step_cost(name, None, image_size, batch, steps)
        row: dict[str, Any] = {"model": name, "plain": plain, "modes": {}}
        for mode in modes:
            res = measure_step_cost(name, mode, image_size, batch, steps)
            if "ms" in res and "ms" in plain:
                res["time_ratio"] = res["ms"] / plain["ms"]
            row["modes"][mode] = res
        log.info("cost %s: plain %s; %s", name, format_cost(plain), "; ".join(
            f"{m} {format_cost(r)}" for m, r in row["modes"].items()))
        rows.append(row)
    return rows


def format_cost(res: dict[str, Any]) -> str:
    """Format one measurement as a table cell: ``fails``, or time (× plain), peak MiB."""
    if "error" in res:
        return "fails"
    ratio = f" ({res['time_ratio']:.1f}×)" if "time_ratio" in res else ""
    mem = f", {res['peak_mib']:.0f} MiB" if res.get("peak_mib") is not None else ""
    return f"{res['ms']:.0f} ms{ratio}{mem}"
