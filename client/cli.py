"""``fl-client``: a hospital joins a Consilia federation with one YAML file.

Usage::

    fl-client --site site.yaml            # run: SuperNode + the site's ClientApp process
    fl-client --site site.yaml --check    # config, certificates, key, data, coordinator
    fl-client --site site.yaml --privacy  # the privacy ledger in plain language

Exit codes: 0 success; 1 ``--check`` found a problem (or the ledger is unreadable);
2 the site config is invalid or the site cannot start.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from consilia.client.site.config import SiteConfig, load_site_config
from consilia.common.config import ConfigError
from consilia.common.logs import SITE, setup_logging

__all__ = ["build_parser", "main", "privacy_text"]

log = logging.getLogger("consilia.site")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fl-client`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fl-client",
        description="Run a hospital site of a Consilia federation (outbound TLS only).",
    )
    parser.add_argument("--site", required=True, type=Path, metavar="SITE_YAML",
                        help="the site's configuration file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="check config, certificate, key, data and the coordinator "
                      "connection, then exit (no training)")
    mode.add_argument("--privacy", action="store_true",
                      help="print the site's privacy ledger in plain language and exit")
    parser.add_argument("--decode", action="store_true",
                        help="with --check: decode every image (slower, finds corrupt pixels)")
    parser.add_argument("--json", action="store_true",
                        help="with --privacy: print the ledger as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def privacy_text(config: SiteConfig) -> str:
    """Return the site's privacy policy and ledger in plain language, for hospital IT.

    Raises
    ------
    consilia.client.privacy.ledger_file.LedgerCorruptError
        If the ledger file exists but cannot be trusted.

    """
    from consilia.client.privacy.ledger import PrivacyLedger  # opacus: only for --privacy

    dp = config.policy.dp
    if dp.required:
        rule = (
            "this site trains only with local differential privacy, at most "
            f"ε={dp.max_run_epsilon:g} per run"
            + (" (runs that do not ask for it get the site's own DP)"
               if dp.when_not_requested == "enforce" else " (runs without it are refused)")
        )
    else:
        rule = "differential privacy is applied when a run asks for it (not required)"
    delta = f"δ={dp.delta:g}" if dp.delta is not None else "δ=min(1e-5, 1/(10·n))"
    header = (
        f"Site '{config.name}' privacy policy: {rule}. Lifetime budget per dataset: "
        f"ε={dp.budget_epsilon:g} ({delta}); the coordinator cannot raise it. This site's data "
        f"are recorded as dataset '{config.dataset_key}'."
    )
    ledger = PrivacyLedger(config.ledger_path)
    return header + "\n\n" + ledger.to_text()


def main(argv: list[str] | None = None) -> int:
    """Run ``fl-client``; return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.check:
        from consilia.client.site.check import run_site_check  # only for --check (start-up)

        report = run_site_check(args.site, decode=args.decode)
        print(report.to_text())
        return report.exit_code
    try:
        config = load_site_config(args.site)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.privacy:
        from consilia.client.privacy.ledger import PrivacyLedger  # opacus
        from consilia.client.privacy.ledger_file import LedgerCorruptError

        try:
            if args.json:
                print(json.dumps(PrivacyLedger(config.ledger_path).to_dict(), indent=2))
            else:
                print(privacy_text(config))
        except LedgerCorruptError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    from consilia.client.site.supervisor import SiteSupervisor  # only when the site runs

    setup_logging(args.verbose, config.log_dir / "fl-client.log", SITE)
    supervisor = SiteSupervisor(config, args.site, verbose=args.verbose)
    try:
        return supervisor.run()
    except RuntimeError as exc:
        log.error("cannot start site %s: %s", config.name, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
