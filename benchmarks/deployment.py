"""Benchmark: what the real deployment adds to a round, and what a site sends per round.

Runs the same federation (3 sites, the same MedNIST images and splits, the same model and
rounds) in Flower's simulation engine (``fl-sim``'s path, Ray, one process) and as a real
deployment (``fl-server`` with TLS + site keys, three ``fl-client`` sites on 127.0.0.1), and
compares the time per round (rounds 2..R; round 1 holds start-up). Deployment modes
(``--modes``, default the first two, ``all`` for every one):

- as shipped: the site's long-lived ClientApp process, adaptive site polling (fast while a
  run is active) and the coordinator's :class:`~consilia.common.flower.fast_grid.FastPollGrid`;
- fixed 1 s site polling: the same with the SuperNode and ClientApp process polling at a fixed
  pace (what the site did before adaptive polling);
- plus Flower's 3 s coordinator reply polling (no FastPollGrid);
- Flower's defaults: a fresh ``flwr-clientapp`` process per task, 3 s polls everywhere.

It also reports, per deployed round, the time spent outside the sites' ClientApps (round time
minus the slowest site's app time, from the sites' round logs: transfers, polling and the
coordinator's own work), the bytes each site sent and received per round (the SuperLink's
traffic counters) against the model's size, and the CPU-seconds per round each kind of process
used (SuperLink, SuperNodes, ServerApp, ClientApps; Ray's services and workers in the
simulation; :mod:`benchmarks.proc_cpu`). Usage::

    python -m benchmarks.deployment [--per-site 400] [--rounds 4] [--out b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import yaml

from benchmarks.proc_cpu import (
    ProcessCpuSampler,
    classify_deploy_process,
    classify_simulation_process,
)
from consilia.common.config import RunConfig, SimulationConfig
from consilia.common.paths import repo_shared_data_dir
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.local_federation import LocalFederation, mednist_sites

__all__ = ["main", "per_round_seconds", "report", "run_benchmark", "site_compute_seconds"]

SITES = ["site-00", "site-01", "site-02"]
MODES = {
    "deploy: as shipped (adaptive site polling)": {"isolation": "process", "poll": 1.0,
                                                   "active": 0.1, "fast": True},
    "deploy: fixed 1 s site polling": {"isolation": "process", "poll": 1.0, "active": 1.0,
                                       "fast": True},
    "deploy: + Flower's 3 s coordinator polling": {"isolation": "process", "poll": 1.0,
                                                   "active": 1.0, "fast": False},
    "deploy: Flower defaults (process per task)": {"isolation": "subprocess", "poll": 3.0,
                                                   "active": 3.0, "fast": False},
}
#: Modes run when ``--modes`` is not given (the others are kept for the record).
DEFAULT_MODES = ["deploy: as shipped (adaptive site polling)", "deploy: fixed 1 s site polling"]


def per_round_seconds(run_dir: Path) -> list[float]:
    """Seconds of each round 1..R from ``metrics/rounds.jsonl`` (differences of elapsed_s)."""
    elapsed = [record["elapsed_s"] for record in read_round_records(Path(run_dir))]
    return [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)]


def site_compute_seconds(round_logs: list[Path], run_id: int) -> dict[int, float]:
    """Per round, the slowest site's ClientApp time, summed over the round's message types.

    Read from each site's ``state/logs/rounds.jsonl`` (``timing.app``: the time the site's
    ClientApp ran, without pulling the message or pushing the reply). A round's time minus
    this is what the deployment spends outside the sites' own work: transfers, polling and
    the coordinator's aggregation, evaluation and checkpoint.
    """
    slowest: dict[tuple[int, str], float] = {}
    for path in round_logs:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if str(entry.get("run_id")) != str(run_id) or not str(entry.get("round", "")):
                continue
            key = (int(entry["round"]), str(entry.get("type", "")))
            app = float(entry.get("timing", {}).get("app", 0.0))
            slowest[key] = max(slowest.get(key, 0.0), app)
    out: dict[int, float] = {}
    for (rnd, _kind), seconds in slowest.items():
        out[rnd] = out.get(rnd, 0.0) + seconds
    return out


def _run_config(classes: list[str], rounds: int, epochs: int, model: str) -> RunConfig:
    return RunConfig.model_validate({
        "name": "bench", "seed": 0,
        "task": {"class_names": classes, "in_channels": 1, "image_size": 64},
        "model": {"name": model, "kwargs": {"width": 16} if model == "cnn" else {}},
        "train": {"local_epochs": epochs, "batch_size": 32, "lr": 0.002, "num_threads": 1},
        "strategy": {"name": "fedprox", "rounds": rounds, "min_train_sites": 3,
                     "min_evaluate_sites": 3, "min_available_sites": 3,
                     "round_timeout_s": 900},
    })


def _model_bytes(run: RunConfig) -> int:
    from consilia.common.serde import arrays_from_model, model_from_run_config

    arrays = arrays_from_model(model_from_run_config(run))
    return int(sum(np.asarray(a.numpy()).nbytes for a in arrays.values()))


def _prepare_sites(work: Path, per_site: int, data_root: Path):
    """Export each site's DICOM folder and the simulation's site files with the same split."""
    from consilia.client.site.assembly import stratified_split
    from consilia.common.data.images import ImageData
    from consilia.common.data.sitefile import save_site_npz
    from consilia.simulations.export_sites import export_site_dicoms

    classes, sites, _ = mednist_sites(data_root, len(SITES), per_site, test_size=0, seed=0)
    folders = []
    for i, (name, (images, labels)) in enumerate(zip(SITES, sites, strict=True)):
        folders.append(export_site_dicoms(images, labels, classes, work / "dicom", name,
                                          seed=1))
        tr, va = stratified_split(labels, 0.2, 0)  # what the deployed site does
        save_site_npz(work / "sim-sites" / f"site-{i:02d}.npz", ImageData(images[tr], labels[tr]),
                      ImageData(images[va], labels[va]), classes)
    return classes, folders


def _simulate(run: RunConfig, work: Path, cpus_per_client: float = 1.0) -> dict[str, Any]:
    from consilia.simulations.flower_sim import run_flower_simulation

    run_dir = work / "runs" / "simulation"
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    with _cpu_per_round(lambda: [os.getpid()], run_dir, run.strategy.rounds,
                        classify_simulation_process) as cpu:
        run_flower_simulation(run, run_dir, work / "sim-sites", len(SITES),
                              SimulationConfig(cpus_per_client=cpus_per_client,
                                               threads_per_client=1))
    return {"wall_s": time.perf_counter() - start, "round_s": per_round_seconds(run_dir),
            "cpu_s_per_round": cpu}


def _deploy(fed: LocalFederation, run_yaml: Path, folders: list[Path], name: str,
            mode: dict[str, Any]) -> dict[str, Any]:
    for site, folder in zip(SITES, folders, strict=True):
        fed.write_site_config(site, folder, policy={"allowed_models": [mode["model"]]},
                              runtime={"isolation": mode["isolation"],
                                       "superlink_poll_interval_s": mode["poll"],
                                       "active_poll_interval_s": mode["active"],
                                       "task_poll_interval_s": 0.2},
                              resources={"threads": 1})
        fed.start_site(site)
    fed.wait_online(SITES, timeout_s=300)
    run_dir = fed.root / "runs" / name.split(":")[1].strip().replace(" ", "-")
    args = ["run", str(run_yaml), "--out", str(run_dir), "--detach"]
    if not mode["fast"]:  # submit an app whose ServerApp uses Flower's plain 3 s reply polling
        from consilia.server.control.run_launcher import load_run_config, prepare_run_dir

        app_dir = prepare_run_dir(load_run_config(run_yaml), run_dir, ["bench"],
                                  state_dir=fed.state_dir)
        pyproject = app_dir / "pyproject.toml"
        data = tomllib.loads(pyproject.read_text())
        components = data["tool"]["flwr"]["app"]["components"]
        components["serverapp"] = "consilia.server.plain_grid_app:app"
        pyproject.write_text(tomli_w.dumps(data))
        run_id = _submit_app(fed, app_dir)
    else:
        out = fed.fl_server(*args).stdout
        run_id = int(out.split()[1])
    start = time.perf_counter()
    # everything this process started: coordinator, sites and the follow loop's flwr CLI calls
    with _cpu_per_round(lambda: [os.getpid()], run_dir, int(mode["rounds"])) as cpu:
        info = _wait_finished(fed, run_id, run_dir)
    wall = time.perf_counter() - start
    for site in SITES:
        fed.kill_site(site, 15)
    round_s = per_round_seconds(run_dir)
    compute = site_compute_seconds(
        [fed.site_dir(site) / "state" / "logs" / "rounds.jsonl" for site in SITES], run_id)
    outside = [seconds - compute[i + 1] for i, seconds in enumerate(round_s) if i + 1 in compute]
    return {"wall_s": wall, "round_s": round_s, "outside_sites_s": outside,
            "status": info["status"], "traffic": info.get("network-traffic", {}),
            "cpu_s_per_round": cpu}


@contextmanager
def _cpu_per_round(roots: Callable[[], list[int]], run_dir: Path, rounds: int,
                   classify: Callable[[str], str] = classify_deploy_process,
                   ) -> Iterator[dict[str, float]]:
    """Yield a dict that, on exit, holds each role's CPU seconds per round over rounds 2..R.

    A watcher reads ``metrics/rounds.jsonl`` every 0.25 s and snapshots the CPU totals when
    the lines of round 1 and round R appear (start-up and the work after the last round are
    left out, as in the per-round times).
    """
    sampler = ProcessCpuSampler(roots, classify).start()
    marks: dict[int, dict[str, float]] = {}
    done = threading.Event()
    jsonl = run_dir / "metrics" / "rounds.jsonl"

    def watch() -> None:
        while not done.wait(0.25) and rounds not in marks:
            seen = {json.loads(x).get("round") for x in
                    (jsonl.read_text().split("\n")[:-1] if jsonl.is_file() else []) if x.strip()}
            for rnd in (1, rounds):
                if rnd in seen and rnd not in marks:
                    marks[rnd] = sampler.totals()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        done.set()
        watcher.join()
        sampler.stop()
        if rounds > 1 and 1 in marks and rounds in marks:
            result.update({role: (seconds - marks[1].get(role, 0.0)) / (rounds - 1)
                           for role, seconds in marks[rounds].items()})


def _submit_app(fed: LocalFederation, app_dir: Path) -> int:
    from consilia.server.control.flwr_cli import FlowerOperator

    return FlowerOperator(fed.state_dir / "flwr").start_run(app_dir)


def _wait_finished(fed: LocalFederation, run_id: int, run_dir: Path,
                   timeout_s: float = 3600) -> dict:
    """Follow the run as ``fl-server run`` does (its metrics file; the SuperLink every 10 s).

    Asking the SuperLink every 2 s would start a ``flwr`` CLI process each time, about half a
    core on this machine, and slow the very sites being measured.
    """
    from consilia.server.control.flwr_cli import FlowerOperator
    from consilia.server.control.run_launcher import follow_run

    return follow_run(FlowerOperator(fed.state_dir / "flwr"), run_id, run_dir,
                      total_rounds=0, emit=lambda _line: None, timeout_s=timeout_s)


def run_benchmark(per_site: int, rounds: int, epochs: int, work: Path,
                  modes: list[str], model: str = "cnn",
                  sqlite_state: bool = False,
                  sim_cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Run the simulation and the deployment modes; return every measurement."""
    data_root = Path(os.environ.get("CONSILIA_DATA_ROOT") or repo_shared_data_dir())
    classes, folders = _prepare_sites(work, per_site, data_root)
    run = _run_config(classes, rounds, epochs, model)
    run_yaml = work / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(json.loads(run.model_dump_json())))
    results: dict[str, Any] = {
        "per_site_images": per_site, "rounds": rounds, "local_epochs": epochs, "model": model,
        "model_bytes": _model_bytes(run), "cpu_count": os.cpu_count(), "modes": {},
        "superlink_state": "sqlite" if sqlite_state else "memory",
        "sim_cpus_per_client": sim_cpus_per_client,
    }
    fed = LocalFederation(work / "federation", SITES, env={"OMP_NUM_THREADS": "1"})
    fed.generate_certs()
    try:
        fed.start_coordinator(*(["--sqlite-state"] if sqlite_state else []))
        fed.register_sites()
        for name in modes:
            print(f"-- {name}", flush=True)
            results["modes"][name] = _deploy(fed, run_yaml, folders, name,
                                             {**MODES[name], "model": model,
                                              "rounds": rounds})
            print(json.dumps(results["modes"][name]), flush=True)
    finally:
        fed.stop()
    print("-- simulation (Ray)", flush=True)
    results["modes"]["simulation (Ray)"] = _simulate(run, work, sim_cpus_per_client)
    print(json.dumps(results["modes"]["simulation (Ray)"]), flush=True)
    return results


def report(results: dict[str, Any]) -> str:
    """Return the comparison table: time per round vs simulation, bytes per site per round."""
    sim = statistics.mean(results["modes"]["simulation (Ray)"]["round_s"][1:])
    lines = [f"{results['per_site_images']} images/site, 3 sites, {results['rounds']} rounds, "
             f"{results['local_epochs']} local epoch(s), {results['model']} 64 px; "
             f"{results['cpu_count']} CPU core(s), SuperLink state in "
             f"{results.get('superlink_state', 'memory')}, simulation "
             f"{results.get('sim_cpus_per_client', 1.0):g} CPU per client. "
             "Rounds 2..R (round 1 = start-up).",
             "",
             f"{'mode':<46}{'s/round':>9}{'vs sim':>9}{'round 1 s':>11}"
             f"{'outside sites s':>17}"]
    for name, res in results["modes"].items():
        later = statistics.mean(res["round_s"][1:])
        outside = res.get("outside_sites_s", [])[1:]
        shown = f"{statistics.mean(outside):>17.2f}" if outside else f"{'-':>17}"
        lines.append(f"{name:<46}{later:>9.2f}{(later / sim - 1) * 100:>+8.1f}%"
                     f"{res['round_s'][0]:>11.2f}{shown}")
    model = results["model_bytes"]
    lines += ["", f"model: {model / 1e6:.3f} MB (float32 parameters)"]
    for name, res in results["modes"].items():
        traffic = res.get("traffic")
        if not traffic:
            continue
        per = len(SITES) * results["rounds"]
        down = traffic.get("outbound-bytes", 0) / per
        up = traffic.get("inbound-bytes", 0) / per
        lines.append(f"{name:<46} per site per round: received {down / 1e6:.3f} MB "
                     f"({down / model:.2f}x model), sent {up / 1e6:.3f} MB ({up / model:.2f}x)")
    for name, res in results["modes"].items():
        cpu = res.get("cpu_s_per_round")
        if cpu:
            shares = ", ".join(f"{role} {seconds:.2f}" for role, seconds in cpu.items()
                               if seconds >= 0.005)
            lines.append(f"{name:<46} CPU s per round (2..R): {shares}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (and write JSON with ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--per-site", type=int, default=400, help="images per site")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--model", default="cnn", help="registered model (e.g. resnet18)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated deployment modes, or 'all' (default: "
                        + "; ".join(DEFAULT_MODES) + ")")
    parser.add_argument("--sqlite-state", action="store_true",
                        help="fl-server start --sqlite-state (SuperLink state in SQLite instead "
                        "of memory)")
    parser.add_argument("--sim-cpus-per-client", type=float, default=1.0,
                        help="Ray CPUs per simulated client (1 = fl-sim's default: one client "
                        "per core; 0.66 runs all three at once, like the deployment)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="consilia-bench-deploy-"))
    try:
        modes = list(MODES) if args.modes == "all" else [
            m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
        results = run_benchmark(args.per_site, args.rounds, args.epochs, work, modes,
                                args.model, args.sqlite_state, args.sim_cpus_per_client)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(results)
    print("\n" + text)
    if args.out:
        args.out.write_text(json.dumps({**results, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
