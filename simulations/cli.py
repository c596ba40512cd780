"""``fl-sim``: simulate a federation of virtual hospitals on public medical images.

Examples
--------
``fl-sim`` runs the default experiment (MedNIST, 5 sites, Dirichlet 0.5, FedProx, small CNN).
``fl-sim run --config simulations/scenarios/pneumonia_fedavg.yaml --set strategy.rounds=10``
``fl-sim export-sites RUN_DIR --out sites/`` writes each site's data as DICOM for rehearsal.
``fl-sim run --init-from runs/previous/global_model.safetensors`` starts from saved weights.
``fl-sim run --holdout-site 2`` leaves site 2 out of training and validates on it at the end.
``fl-sim cv --folds 5`` cross-validates the federated pipeline (5 full runs).
``fl-sim tune --search tpe --trials 20 --space lr=1e-4:1e-2:log local_epochs=1,2`` searches
hyperparameters on the sites' federated validation AUC.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from consilia.common.config import ConfigError, load_experiment_config
from consilia.common.logs import setup_logging
from consilia.common.rundir.layout import RunDir

__all__ = ["main"]

DEFAULT_SCENARIO = Path(__file__).parent / "scenarios" / "mednist_fedprox.yaml"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML/TOML experiment file (default: {DEFAULT_SCENARIO.name})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set strategy.rounds=10 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-TIME)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="data root (default: $CONSILIA_DATA_ROOT, then ../shared/data)")
    p.add_argument("--dataset", default=None, help="shortcut for --set data.dataset=NAME")
    p.add_argument("--sites", type=int, default=None, help="shortcut for partition.num_sites")
    p.add_argument("--rounds", type=int, default=None, help="shortcut for strategy.rounds")
    p.add_argument("--strategy", default=None,
                   help="shortcut for strategy.name: fedavg, fedprox, fedadam, fedyogi, "
                   "fedadagrad, fedavgm, trimmed-mean, median, krum, multi-krum, bulyan")
    p.add_argument("--model", default=None, help="shortcut for model.name")
    p.add_argument("--seed", type=int, default=None, help="shortcut for seed")
    p.add_argument("--ray-address", default=None,
                   help="attach to an existing Ray cluster (HOST:PORT) instead of a local one")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the centralized and local-only baselines")
    p.add_argument("--holdout-site", type=int, default=None, metavar="K",
                   help="leave-one-site-out: site K never trains and is evaluated at the end")
    p.add_argument("--tracking", choices=("none", "tensorboard", "mlflow"), default=None,
                   help="also log per-round metrics to TensorBoard or MLflow (if installed)")
    p.add_argument("--init-from", type=Path, default=None, metavar="FILE",
                   help="start from the weights of this Consilia model file (.safetensors, "
                   "e.g. RUN_DIR/global_model.safetensors) instead of a freshly seeded model")
    p.add_argument("--verbose", "-v", action="store_true", help="show Flower/Ray logs")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    shortcuts = {
        "data.root": args.data_root, "data.dataset": args.dataset,
        "partition.num_sites": args.sites, "strategy.rounds": args.rounds,
        "strategy.name": args.strategy, "model.name": args.model, "seed": args.seed,
        "simulation.ray_address": args.ray_address,
        "partition.holdout_site": args.holdout_site, "tracking": args.tracking,
    }
    for key, value in shortcuts.items():
        if value is not None:
            extra.append(f"{key}={value}")
    if args.init_from is not None:  # JSON-quoted: read back verbatim as a YAML string
        extra.append(f"init_from={json.dumps(str(args.init_from.resolve()))}")
    if args.no_baselines:
        extra += ["baselines.centralized=false", "baselines.local_only=false"]
    if args.sites is not None:
        # keep the minimums feasible when the user shrinks the federation
        n = args.sites - (1 if args.holdout_site is not None else 0)
        extra += [
            f"strategy.{field}={min(2, n)}"
            for field in ("min_train_sites", "min_evaluate_sites", "min_available_sites")
        ]
    return extra


def _cmd_run(args: argparse.Namespace) -> int:
    from consilia.simulations.run import comparison_table, run_experiment

    logger = setup_logging(args.verbose)
    config_path = args.config or DEFAULT_SCENARIO
    cfg = load_experiment_config(config_path, _overrides(args))
    result = run_experiment(cfg, args.out, verbose=args.verbose, argv=sys.argv)
    logger.info("final test-split metrics (same split for every model):\n%s",
                comparison_table(result.final))
    secs = result.final.get("seconds", {})
    ext = result.final.get("external_validation")
    if ext:
        logger.info("external validation on held-out %s (%d images):\n%s", ext["site"], ext["n"],
                    comparison_table(ext))
    logger.info("wall time: %s", ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    logger.info("results: %s", result.run_dir)
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from consilia.simulations.crossval import format_summary, run_cross_validation

    logger = setup_logging(args.verbose)
    cfg = load_experiment_config(args.config or DEFAULT_SCENARIO, _overrides(args))
    result = run_cross_validation(cfg, args.folds, args.out, verbose=args.verbose, argv=sys.argv)
    logger.info("%d-fold cross-validation, test folds (mean ± std):\n%s", args.folds,
                format_summary(result.summary))
    logger.info("results: %s", result.out_dir)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from consilia.simulations.tune import format_results, parse_space, run_tuning

    logger = setup_logging(args.verbose)
    cfg = load_experiment_config(args.config or DEFAULT_SCENARIO, _overrides(args))
    specs = parse_space([item for group in args.space for item in group])
    result = run_tuning(cfg, specs, args.search, args.trials, args.out,
                        grid_points=args.grid_points, verbose=args.verbose)
    logger.info("tuning results (objective = federated validation AUC, last round):\n%s",
                format_results(result.table))
    logger.info("best: %s -> %.4f; run it with fl-sim run --config %s",
                ", ".join(f"{k}={v}" for k, v in result.best_params.items()), result.best_value,
                result.out_dir / "best_config.yaml")
    return 0


def _cmd_export_sites(args: argparse.Namespace) -> int:
    from consilia.simulations.export_sites import export_partition_to_dicom

    logger = setup_logging(False)
    if not RunDir(args.run_dir).sites_dir.is_dir():
        raise ConfigError(f"{args.run_dir}: no sites/ folder; pass the directory of an fl-sim run")
    out = export_partition_to_dicom(args.run_dir, args.out)
    logger.info("wrote per-site DICOM folders to %s", out)
    return 0


def _cmd_list(_: argparse.Namespace) -> int:
    from consilia.common.data.datasets import DATASETS
    from consilia.common.models import MODELS

    print("models:")
    for name in MODELS.names():
        spec = MODELS.get(name)
        print(f"  {name:<16} min {spec.min_image_size:>3}px  {spec.description}")
    print("datasets:")
    for name in DATASETS.names():
        print(f"  {name}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from consilia.common.paths import resolve_data_root

    root = resolve_data_root(args.data_root)
    if args.dataset == "mednist":
        from consilia.common.data.datasets.mednist import download_mednist

        download_mednist(root)
    else:
        from consilia.common.data.datasets.medmnist import download_medmnist

        download_medmnist(args.dataset, root)
    print(f"downloaded {args.dataset} under {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``fl-sim`` argument parser."""
    parser = argparse.ArgumentParser(prog="fl-sim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a simulation experiment (the default command)")
    _add_run_arguments(run)
    run.set_defaults(func=_cmd_run)
    cv = sub.add_parser("cv", help="k-fold cross-validation of the federated pipeline")
    _add_run_arguments(cv)
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.set_defaults(func=_cmd_cv)
    tune = sub.add_parser("tune", help="hyperparameter search on the federated validation AUC")
    _add_run_arguments(tune)
    tune.add_argument("--search", choices=("grid", "random", "tpe"), default="tpe",
                      help="sampler (default tpe, Bayesian)")
    tune.add_argument("--trials", type=int, default=None,
                      help="number of trials (default: the grid size for grid, else 10)")
    tune.add_argument("--space", nargs="+", action="append", required=True, metavar="NAME=SPEC",
                      help="e.g. lr=1e-4:1e-2:log local_epochs=1,2 proximal_mu=0,0.01,0.1 "
                           "batch_size=16,32,64 (ranges LO:HI[:log], lists A,B,C)")
    tune.add_argument("--grid-points", type=int, default=3,
                      help="values per range in a grid search (default 3)")
    tune.set_defaults(func=_cmd_tune)
    exp = sub.add_parser("export-sites", help="write a run's sites as DICOM folders + labels CSV")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--out", type=Path, required=True)
    exp.set_defaults(func=_cmd_export_sites)
    lst = sub.add_parser("list", help="list registered models and datasets")
    lst.set_defaults(func=_cmd_list)
    dl = sub.add_parser("download", help="download a public dataset (needs internet)")
    dl.add_argument("dataset", help="mednist or a MedMNIST flag such as pneumoniamnist")
    dl.add_argument("--data-root", type=Path, default=None)
    dl.set_defaults(func=_cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-sim``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fl-sim: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"fl-sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
