"""``fl-server``: the coordinator operator's command line.

Examples
--------
``fl-server start --certs certs/`` runs the SuperLink (TLS, site keys, no runtime installs).
``fl-server register-site site-a.pub --name site-a`` lets that key join; ``fl-server sites``.
``fl-server run run.yaml --out runs/first`` launches a run and prints each round.
``fl-server proxy-config --operators 10.1.0.0/24 --out /etc/nginx/conf.d`` writes the proxy.

"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from consilia.common.config import ConfigError
from consilia.common.rundir.layout import RunDir
from consilia.common.rundir.round_records import read_round_records
from consilia.server.control.flwr_cli import (
    Connection,
    FlowerOperator,
    OperatorError,
    write_connection,
)
from consilia.server.control.proxy import (
    ProxyConfigError,
    operators_allow_file,
    render_proxy_config,
)
from consilia.server.control.run_launcher import (
    RunTimeoutError,
    follow_run,
    load_run_config,
    prepare_run_dir,
)
from consilia.server.control.site_registry import SiteRegistry, SiteRegistryError, read_public_key
from consilia.server.control.state_dir import STATE_ENV, default_state_dir, secure_state_dir
from consilia.server.control.superlink import (
    INSECURE_WARNING,
    CoordinatorCerts,
    SuperLinkError,
    SuperLinkSettings,
    check_port_free,
    log_size,
    start_superlink,
    stop_process,
    wait_until_ready,
)

__all__ = ["default_state_dir", "main"]

PROXY_TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / (
    "consilia-coordinator.conf.template"
)


def _flwr_home(state_dir: Path) -> Path:
    return Path(state_dir) / "flwr"


def _operator(args: argparse.Namespace) -> FlowerOperator:
    state = Path(args.state_dir)
    if args.superlink:
        if not args.ca and not args.insecure_connection:
            raise ConfigError("--superlink needs --ca CA.crt (or --insecure-connection)")
        write_connection(_flwr_home(state),
                         Connection(args.superlink, None if args.insecure_connection
                                    else Path(args.ca)))
    return FlowerOperator(_flwr_home(state))


# -- start -----------------------------------------------------------------------------------
def _cmd_start(args: argparse.Namespace) -> int:
    if args.insecure and args.certs:
        raise ConfigError("choose either --certs DIR or --insecure, not both")
    if not args.insecure and not args.certs:
        raise ConfigError("--certs DIR is required (create it with deploy/gen-certs.sh); "
                          "--insecure exists for isolated tests only")
    certs = None if args.insecure else CoordinatorCerts.from_dir(args.certs)
    settings = SuperLinkSettings(state_dir=Path(args.state_dir).resolve(), certs=certs,
                                 host=args.host, port=args.port, insecure=args.insecure,
                                 memory_state=not args.sqlite_state)
    check_port_free(args.host, args.port)
    loosened = secure_state_dir(settings.state_dir)
    if loosened:
        print(f"notice: {len(loosened)} path(s) in {settings.state_dir} were readable by other "
              f"users; now owner-only: {', '.join(str(p) for p in loosened[:5])}"
              + (" ..." if len(loosened) > 5 else ""), file=sys.stderr, flush=True)
    write_connection(_flwr_home(settings.state_dir),
                     Connection(settings.local_address, certs.ca if certs else None))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the SuperLink listens on {args.host}: its control API (register "
              "sites, submit runs) is unauthenticated in open-source Flower. Keep the port "
              "off the internet and let sites in through the reverse proxy "
              "(fl-server proxy-config), or firewall it to the proxy's address.",
              file=sys.stderr, flush=True)
    log_offset = log_size(settings.log_file)
    proc = start_superlink(settings, foreground=args.foreground)

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        wait_until_ready(settings.local_address, certs.ca if certs else None, args.ready_timeout,
                         proc, None if args.foreground else settings.log_file, log_offset)
        mode = "INSECURE (no TLS, no site authentication)" if args.insecure else (
            "TLS + site-key authentication")
        if settings.memory_state:
            for line in restore_registered_sites(
                    SiteRegistry(settings.state_dir / "sites.json"),
                    FlowerOperator(_flwr_home(settings.state_dir))):
                print(line, flush=True)
        print(f"coordinator ready on {args.host}:{args.port}, {mode}; state in "
              f"{settings.state_dir}" + ("" if args.foreground else
                                         f", log {settings.log_file}"), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("stopping the coordinator ...", flush=True)
        return 0 if stop_process(proc) is not None else 1
    finally:
        if proc.poll() is None:
            stop_process(proc)


# -- sites -------------------------------------------------------------------------------------
def restore_registered_sites(registry: SiteRegistry, operator: FlowerOperator) -> list[str]:
    """Register every site of ``registry`` with a fresh (in-memory) SuperLink again.

    Returns the lines to print. Sites recorded without their key (registered by an older
    version) are named, with what to do.
    """
    restored, missing, failed = [], [], []
    for entry in registry.load():
        if not entry.public_key:
            missing.append(entry.name)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / f"{entry.name}.pub"
            key.write_text(entry.public_key + "\n")
            try:
                registry.set_node_id(entry.name, operator.register_node(key, entry.name))
                restored.append(entry.name)
            except OperatorError as exc:
                failed.append(f"{entry.name} ({exc})")
    lines = []
    if restored:
        lines.append(f"registered {len(restored)} site(s) again: {', '.join(restored)}")
    if missing:
        lines.append(f"warning: no stored key for {', '.join(missing)}: run 'fl-server "
                     "unregister-site NAME' and 'register-site KEY.pub --name NAME' again")
    if failed:
        lines.append(f"warning: could not register again: {'; '.join(failed)}")
    return lines


def _cmd_register(args: argparse.Namespace) -> int:
    registry = SiteRegistry(Path(args.state_dir) / "sites.json")
    key_line, fingerprint = read_public_key(args.public_key)
    registry.check_new(args.name, fingerprint)
    node_id = _operator(args).register_node(args.public_key, args.name)
    registry.add(args.name, node_id, fingerprint, key_line)
    print(f"registered site '{args.name}' as node {node_id} (key {fingerprint})")
    return 0


def _cmd_unregister(args: argparse.Namespace) -> int:
    registry = SiteRegistry(Path(args.state_dir) / "sites.json")
    entry = next((e for e in registry.load() if e.name == args.name), None)
    if entry is None:
        registry.remove(args.name)  # raises with the known names
        return 1
    _operator(args).unregister_node(entry.node_id)
    registry.remove(args.name)
    print(f"unregistered site '{args.name}' (node {entry.node_id}); its key can no longer join")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    names = SiteRegistry(Path(args.state_dir) / "sites.json").by_node_id()
    rows = []
    for node in _operator(args).list_nodes():
        if node.get("status") == "unregistered":
            continue
        node_id = int(node["node-id"])
        entry = names.get(node_id)
        rows.append({"name": entry.name if entry else "(unknown)", "node_id": node_id,
                     "status": node.get("status"), "online_at": node.get("online-at"),
                     "fingerprint": entry.fingerprint if entry else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sites registered; add one with 'fl-server register-site KEY.pub --name NAME'")
        return 0
    print(f"{'site':<20}{'node id':>22}  {'status':<12}{'online since':<22}key")
    for r in rows:
        print(f"{r['name']:<20}{r['node_id']:>22}  {r['status']:<12}{str(r['online_at']):<22}"
              f"{r['fingerprint'] or ''}")
    return 0


# -- runs ------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    run = load_run_config(args.config, args.overrides, init_from=args.init_from)
    operator = _operator(args)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (args.out or Path("runs") / f"{run.name}-{stamp}").resolve()
    app_dir = prepare_run_dir(run, run_dir, sys.argv, state_dir=Path(args.state_dir),
                              test_set=args.test_set)
    run_id = operator.start_run(app_dir)
    (run_dir / "deployment.json").write_text(json.dumps({"run_id": run_id}, indent=2))
    print(f"run {run_id} submitted: {run.strategy.name}, {run.strategy.rounds} rounds, "
          f"model {run.model.name}, min {run.strategy.min_train_sites} site(s) per round; "
          f"run directory {run_dir}", flush=True)
    if args.detach:
        return 0
    names = {f"node-{e.node_id}": e.name
             for e in SiteRegistry(Path(args.state_dir) / "sites.json").load()}
    try:
        info = follow_run(operator, run_id, run_dir, run.strategy.rounds,
                          emit=lambda line: print(line, flush=True), timeout_s=args.timeout,
                          site_names=names)
    except KeyboardInterrupt:
        print(f"interrupted: stopping run {run_id}", file=sys.stderr)
        operator.stop_run(run_id)
        return 130
    except RunTimeoutError as exc:
        print(f"{exc}; stopping it", file=sys.stderr)
        operator.stop_run(run_id)
        return 1
    status = str(info.get("status"))
    traffic = info.get("network-traffic") or {}
    print(f"run {run_id} {status} in {float(info.get('elapsed', 0)):.1f}s; "
          f"{traffic.get('outbound-bytes', 0) / 1e6:.2f} MB sent to sites, "
          f"{traffic.get('inbound-bytes', 0) / 1e6:.2f} MB received")
    if status != "finished:completed":
        print(operator.logs(run_id)[-4000:], file=sys.stderr)
        return 1
    rounds = _read_rounds(run_dir)
    trained = [r["round"] for r in rounds if r.get("round", 0) > 0 and r.get("train")]
    if not trained:
        print("no round was trained by enough sites: the global model is still the initial "
              "one (see the failures above)", file=sys.stderr)
        return 1
    print(f"global model: {RunDir(run_dir).global_model_path} ({len(trained)} of "
          f"{run.strategy.rounds} round(s) aggregated)")
    return 0


def _read_rounds(run_dir: Path) -> list[dict]:
    return read_round_records(run_dir)


def _cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_operator(args).run_info(args.run_id), indent=2))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    _operator(args).stop_run(args.run_id)
    print(f"run {args.run_id} stopped")
    return 0


def _cmd_proxy_config(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    allow = out / "consilia-operators.allow"
    allow.write_text(operators_allow_file(args.operators.split(",")))
    text = render_proxy_config(args.template, {
        "CONSILIA_PROXY_LISTEN": args.listen,
        "CONSILIA_SUPERLINK": args.superlink_address,
        "CONSILIA_SUPERLINK_TLS_NAME": args.superlink_tls_name,
        "CONSILIA_CERTS_DIR": str(Path(args.certs).resolve()),
        "CONSILIA_OPERATORS_ALLOW": str(allow.resolve()),
    })
    conf = out / "consilia-coordinator.conf"
    conf.write_text(text)
    print(f"wrote {conf} and {allow}; include the .conf in nginx's http {{}} block")
    return 0


# -- parser ----------------------------------------------------------------------------------
def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", default=None, metavar="HOST:PORT",
                   help="reach the SuperLink (or the proxy) here instead of the connection "
                        "saved by 'fl-server start'")
    p.add_argument("--ca", type=Path, default=None, help="CA certificate for --superlink")
    p.add_argument("--insecure-connection", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``fl-server`` argument parser."""
    parser = argparse.ArgumentParser(prog="fl-server", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(),
                        help=f"coordinator state (default: ${STATE_ENV} or "
                             "~/.consilia/coordinator)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="run the coordinator (Flower SuperLink) in the foreground")
    p.add_argument("--certs", type=Path, default=None,
                   help="directory with ca.crt, coordinator.crt, coordinator.key")
    p.add_argument("--host", default="127.0.0.1",
                   help="listen address (default 127.0.0.1: behind the reverse proxy; "
                        "0.0.0.0 exposes the unauthenticated control API to the network)")
    p.add_argument("--port", type=int, default=9093, help="listen port (default 9093)")
    p.add_argument("--insecure", action="store_true",
                   help="NO TLS and NO site authentication (isolated tests only)")
    p.add_argument("--sqlite-state", action="store_true",
                   help="keep the SuperLink's messages and runs in SQLite (<state>/superlink.db) "
                        "instead of memory; rounds are slower (docs/deployment.md). Either way "
                        "registered sites come back after a restart (<state>/sites.json)")
    p.add_argument("--memory-state", action="store_true",
                   help=argparse.SUPPRESS)  # the default since SQLite became opt-in
    p.add_argument("--foreground", action="store_true",
                   help="print the SuperLink's log here instead of <state>/superlink.log")
    p.add_argument("--ready-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser("register-site", help="let a site's public key join the federation")
    p.add_argument("public_key", type=Path, help="the site's OpenSSH ECDSA public key (.pub)")
    p.add_argument("--name", required=True, help="site name (e.g. the hospital's short name)")
    _connection_args(p)
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("unregister-site", help="remove a site; its key can no longer join")
    p.add_argument("name")
    _connection_args(p)
    p.set_defaults(func=_cmd_unregister)

    p = sub.add_parser("sites", help="list registered sites and whether they are online")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _connection_args(p)
    p.set_defaults(func=_cmd_sites)

    p = sub.add_parser("run", help="launch a run from a run config and follow its rounds")
    p.add_argument("config", type=Path, help="run config YAML/TOML (deploy/run.example.yaml)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory on this (the coordinator) machine "
                        "(default: runs/NAME-UTCTIME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set strategy.rounds=10 (repeatable)")
    p.add_argument("--test-set", type=Path, default=None,
                   help="coordinator-held test split (.npz: images uint8 NxCxHxW, labels) "
                        "for server-side evaluation of the global model each round")
    p.add_argument("--init-from", type=Path, default=None, metavar="FILE",
                   help="start from the weights of this Consilia model file (.safetensors, on "
                        "this machine) instead of a freshly seeded model")
    p.add_argument("--detach", action="store_true", help="submit and return at once")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the run if it has not finished after this many seconds")
    _connection_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="status, timings and traffic of a run")
    p.add_argument("run_id", type=int)
    _connection_args(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("stop", help="stop a run")
    p.add_argument("run_id", type=int)
    _connection_args(p)
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("proxy-config", help="write the nginx reverse-proxy configuration")
    p.add_argument("--operators", required=True,
                   help="comma-separated operator addresses/CIDRs allowed to use the control API")
    p.add_argument("--certs", type=Path, required=True, help="coordinator certificates directory")
    p.add_argument("--listen", default="9092", help="public listen address (default 9092)")
    p.add_argument("--superlink-address", default="127.0.0.1:9093",
                   help="where the SuperLink listens (default 127.0.0.1:9093)")
    p.add_argument("--superlink-tls-name", default="localhost",
                   help="name in the coordinator certificate used to verify the SuperLink")
    p.add_argument("--template", type=Path, default=PROXY_TEMPLATE,
                   help="nginx template (default: deploy/nginx/ in this checkout)")
    p.add_argument("--out", type=Path, required=True, help="directory for the two files")
    p.set_defaults(func=_cmd_proxy_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-server``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "insecure_connection", False):
        print(INSECURE_WARNING, file=sys.stderr)
    try:
        return int(args.func(args))
    except (ConfigError, SuperLinkError, OperatorError, SiteRegistryError,
            ProxyConfigError) as exc:
        print(f"fl-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
