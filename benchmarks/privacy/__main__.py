"""Command line of the privacy benchmark: ``python -m benchmarks.privacy --help``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import benchmarks.privacy
from benchmarks.privacy.central import run_central
from benchmarks.privacy.docs_section import update_docs
from benchmarks.privacy.markdown import to_markdown
from benchmarks.privacy.recipe import DATASETS, MIA_EPSILONS
from benchmarks.privacy.step_cost import measure_default_overhead, run_cost
from benchmarks.privacy.utility import run_utility, site_train_seconds

__all__ = ["main"]

log = logging.getLogger("consilia.privacy_bench")


def _environment() -> dict[str, Any]:
    import platform
    from importlib import metadata

    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
            f"{__import__('os').cpu_count()} cores", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "opacus": metadata.version("opacus"),
            "flwr": metadata.version("flwr")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    from consilia.common.models import MODELS

    summary = (benchmarks.privacy.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=summary)
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-bench"))
    parser.add_argument("--parts", default="utility,central,cost,overhead", help="utility "
                        "(with the MIA audit), central, cost, overhead (default-model A/B "
                        "timing); comma-separated. Results of parts not run are kept from "
                        "DIR/privacy_bench.json; none = re-render them")
    parser.add_argument("--ab-steps", type=int, default=30)
    parser.add_argument("--central-noise", type=float, default=1.0)
    parser.add_argument("--central-clip", type=float, default=1.0)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (even)")
    parser.add_argument("--per-group", type=int, default=500,
                        help="members (and non-members) in the MIA audit")
    parser.add_argument("--models", default=",".join(MODELS.names()))
    parser.add_argument("--modes", default="hooks,functorch,ew,ghost")
    parser.add_argument("--cost-size", type=int, default=32)
    parser.add_argument("--cost-batch", type=int, default=32)
    parser.add_argument("--cost-steps", type=int, default=5)
    parser.add_argument("--docs", type=Path, default=None,
                        help="update this Markdown file's '## Differential privacy' section")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "privacy_bench.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    command = "python -m benchmarks.privacy " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    earlier = results.pop("command", None)  # files written before "commands" existed
    results["commands"] = [*results.get("commands", [earlier] if earlier else [])]
    if args.parts != "none":  # "none": re-render the saved results only
        results["commands"].append(command)
    results["environment"] = _environment()
    seconds = results.setdefault("part_seconds", {})
    if "seconds" in results:
        seconds.setdefault("earlier parts", results.pop("seconds"))
    started = time.perf_counter()
    if "utility" in parts:
        epsilons = [math.inf if e == "inf" else float(e) for e in args.epsilons.split(",")]
        results["utility"] = run_utility(
            args.out, args.datasets.split(","), epsilons,
            [e for e in epsilons if e in MIA_EPSILONS], args.shadows, args.per_group,
            args.overrides)
        seconds["utility+mia"] = round(time.perf_counter() - started, 1)
    if "central" in parts:
        t0 = time.perf_counter()
        results["central"] = run_central(args.out, args.datasets.split(","), args.central_noise,
                                         args.central_clip, args.overrides)
        seconds["central"] = round(time.perf_counter() - t0, 1)
    if "cost" in parts:
        results["cost_config"] = {"image_size": args.cost_size, "batch": args.cost_batch,
                                  "steps": args.cost_steps}
        t0 = time.perf_counter()
        results["cost"] = run_cost(args.models.split(","), args.modes.split(","),
                                   args.cost_size, args.cost_batch, args.cost_steps)
        seconds["cost"] = round(time.perf_counter() - t0, 1)
    if "overhead" in parts:
        t0 = time.perf_counter()
        from consilia.client.privacy.dpsgd import choose_grad_sample_mode

        mode = choose_grad_sample_mode("cnn")
        results["default_overhead"] = [
            measure_default_overhead(mode, size, batch, args.ab_steps, kwargs)
            for size, batch, kwargs in ((32, 64, {"width": 16}), (28, 64, {"width": 16}),
                                        (64, 32, {"width": 16}), (64, 32, {}))]
        for r in results["default_overhead"]:
            log.info("default model A/B %s %s %d px batch %d: %.1f vs %.1f ms (%.2f×)",
                     r["model"], r["kwargs"], r["image_size"], r["batch"], r["plain_ms"],
                     r["private_ms"], r["ratio"])
        seconds["overhead"] = round(time.perf_counter() - t0, 1)
    for row in results.get("utility") or []:  # rows from before the column existed
        if row.get("site_train_seconds") is None and row.get("run_dir"):
            row["site_train_seconds"] = site_train_seconds(Path(row["run_dir"]))
    saved.write_text(json.dumps(results, indent=2, default=str))
    section = to_markdown(results) + "\nBenchmark time: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n"
    (args.out / "privacy_bench.md").write_text(section)
    if args.docs is not None:
        update_docs(args.docs, section)
    print(section)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
