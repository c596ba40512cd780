"""Benchmark: per-task overhead of Flower's subprocess isolation vs the site's long-lived process.

Not collected by pytest (run it by hand; ~5 minutes on 2 cores)::

    python benchmarks/site_isolation.py [--rounds 6] [--out bench.json]

One SuperLink (TLS + node auth) on 127.0.0.1 and one site started with ``fl-client``; a
probe ServerApp sends a tiny Consilia task (cnn, 16 px, 10 images) as train + evaluate
messages each round and measures, at the coordinator, the time from sending a message to
receiving the reply. The coordinator's own reply polling (Flower's HttpGrid: every 3 s) is
capped at 0.1 s in the probe so that the numbers show the site's side. Round 1 (process
start, data loading) is reported separately.

Modes: Flower's default (``subprocess``: a fresh ``flwr-clientapp`` per task) and the
site's long-lived ClientApp process, each with Flower's 3 s SuperNode idle poll and with
fl-client's default 1 s cap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kits"))

import site_testkit as kit  # noqa: E402

MODES = {
    "flower-subprocess (default), poll 3 s": ("subprocess", 3.0),
    "long-lived process, poll 3 s": ("process", 3.0),
    "flower-subprocess, poll 1 s": ("subprocess", 1.0),
    "long-lived process, poll 1 s (fl-client default)": ("process", 1.0),
}


def run_mode(link: kit.LocalSuperLink, site_dir: Path, work: Path, name: str,
             isolation: str, poll: float, rounds: int) -> dict:
    """Start the site in one mode, run the probe, stop the site; return the timings."""
    config = yaml.safe_load((site_dir / "site.yaml").read_text())
    config["runtime"].update({"isolation": isolation, "superlink_poll_interval_s": poll})
    (site_dir / "site.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rounds_log = site_dir / "state" / "logs" / "rounds.jsonl"
    rounds_log.unlink(missing_ok=True)
    tag = name.split(",")[0].replace(" ", "-") + f"-{poll:g}"
    out = work / f"{tag}.json"
    client = subprocess.Popen(
        [sys.executable, "-m", "consilia.client.cli", "--site", str(site_dir / "site.yaml")],
        stdout=(work / f"{tag}.log").open("w"), stderr=subprocess.STDOUT,
    )
    try:
        app = kit.write_probe_app(work / f"app-{tag}", kit.tiny_run_json(rounds=rounds), out,
                                  evaluate=True, grid_poll_s=0.1, wait_s=120, timeout_s=300)
        start = time.time()
        link.submit(app)
        while not out.exists():
            if time.time() - start > 900:
                raise RuntimeError(f"{name}: no result after 900 s")
            time.sleep(1)
    finally:
        client.send_signal(signal.SIGTERM)
        client.wait(timeout=90)
    result = json.loads(out.read_text())
    first = [r["seconds"] for r in result["rounds"] if r["round"] == 1]
    later = [r["seconds"] for r in result["rounds"] if r["round"] > 1]
    errors = [rep for r in result["rounds"] for rep in r["replies"] if "error" in rep]
    site_side = []
    if rounds_log.exists():
        for line in rounds_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["round"] != "1":
                site_side.append(entry["seconds"])
    return {
        "mode": name, "isolation": isolation, "superlink_poll_s": poll,
        "round1_messages_s": [round(x, 2) for x in first],
        "per_message_s_median": round(statistics.median(later), 2),
        "per_message_s_mean": round(statistics.mean(later), 2),
        "per_message_s": [round(x, 2) for x in later],
        "site_task_s_median": round(statistics.median(site_side), 3) if site_side else None,
        "errors": errors,
    }


def main() -> None:
    """Run every mode and print a table (and JSON with ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.site_isolation")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--modes", nargs="*", type=int, help="indices into MODES (default: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="consilia-bench-"))
    certs = kit.make_certs(work / "coordinator")
    (work / "link").mkdir()
    link = kit.LocalSuperLink(work / "link", certs).start()
    site_dir = work / "site"
    kit.write_site(site_dir, coordinator=f"127.0.0.1:{link.port}")
    shutil.copy(certs["ca"], site_dir / "certs" / "ca.crt")
    link.register(site_dir / "keys" / "site.key.pub", "hospital-a")
    results = []
    try:
        chosen = list(MODES.items())
        if args.modes:
            chosen = [chosen[i] for i in args.modes]
        for name, (isolation, poll) in chosen:
            print(f"== {name}", flush=True)
            res = run_mode(link, site_dir, work, name, isolation, poll, args.rounds)
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        link.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nmode | per message (median, s) | round 1 messages (s) | site-side task (median, s)")
    for r in results:
        print(f"{r['mode']} | {r['per_message_s_median']} | {r['round1_messages_s']} | "
              f"{r['site_task_s_median']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
