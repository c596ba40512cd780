"""``fl-client --site site.yaml --check``: tell whether a site is ready to join, without training.

Checks, in order, and reports each as OK / WARN / FAIL with what to do:

1. the site config validates;
2. the CA certificate is a readable PEM certificate (and not expired);
3. the authentication key is an OpenSSH ECDSA private key that only its owner can read;
4. the state directory (logs, cache, privacy ledger) is writable and the ledger readable;
5. the data: images per class, image sizes, files skipped and why (the full list of every
   file and its reason is written to ``<state_dir>/data-report.json``);
6. the policy: known model names, approved app bundles, isolation mode;
7. the local runtime port is free;
8. a TLS handshake with the coordinator, verified with the CA and the coordinator's name.

Any FAIL makes the command exit non-zero.
"""

from __future__ import annotations

import socket
import ssl
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from consilia.client.site.config import SiteConfig, load_site_config
from consilia.client.site.data_sources.config import DataSourceError
from consilia.client.site.data_sources.loading import scan_site_data
from consilia.client.site.data_sources.report import DATA_REPORT_FILE
from consilia.common.config import ConfigError

__all__ = [
    "CheckReport",
    "CheckResult",
    "TLSProbeError",
    "certificate_failure_hint",
    "check_auth_key",
    "check_ca_certificate",
    "probe_tls",
    "run_site_check",
]

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class CheckResult:
    """One line of the report."""

    name: str
    status: str
    detail: str


@dataclass
class CheckReport:
    """All checks of one site config."""

    config_path: Path
    results: list[CheckResult] = field(default_factory=list)
    data_text: str = ""

    def add(self, name: str, status: str, detail: str) -> CheckResult:
        """Record a result and return it."""
        result = CheckResult(name, status, detail)
        self.results.append(result)
        return result

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(r.status != FAIL for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when ready, 1 when a check failed."""
        return 0 if self.ok else 1

    def to_text(self) -> str:
        """Readable report for hospital IT."""
        lines = [f"Consilia site check: {self.config_path}", ""]
        for r in self.results:
            body = r.detail.replace("\n", "\n         ")
            lines.append(f"[{r.status:<4}] {r.name}: {body}")
        if self.data_text:
            lines += ["", self.data_text.rstrip()]
        n_fail = sum(r.status == FAIL for r in self.results)
        n_warn = sum(r.status == WARN for r in self.results)
        lines.append("")
        if n_fail:
            lines.append(
                f"NOT READY: {n_fail} problem(s), {n_warn} warning(s). Fix the FAIL lines."
            )
        else:
            lines.append(f"READY ({n_warn} warning(s)).")
        return "\n".join(lines)


class TLSProbeError(RuntimeError):
    """The TLS connection to the coordinator failed; the message says why and what to check."""


def check_ca_certificate(path: Path) -> tuple[str, str]:
    """Return ``(status, detail)`` for the CA certificate file."""
    from cryptography import x509

    if not path.is_file():
        return FAIL, f"{path} not found (ask the coordinator for its CA certificate, ca.crt)"
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        return FAIL, f"{path} is not a PEM certificate ({exc})"
    cert = certs[0]
    now = datetime.now(UTC)
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc < now:
        expired = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        return FAIL, f"{path}: CA certificate '{subject}' expired on {expired}"
    return OK, f"{path} ({subject}, valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def check_auth_key(path: Path) -> tuple[str, str]:
    """Return ``(status, detail)`` for the site's authentication key (file, permissions, type)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not path.is_file():
        return FAIL, (
            f"{path} not found; create it with: ssh-keygen -t ecdsa -b 384 -N '' -f {path} "
            "and send the .pub file to the coordinator for registration"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return FAIL, (
            f"{path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}"
        )
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return FAIL, f"{path} is not an unencrypted OpenSSH private key ({exc})"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return FAIL, f"{path} is a {type(key).__name__}; Flower needs ECDSA (ssh-keygen -t ecdsa)"
    pub = path.with_name(path.name + ".pub")
    extra = f"; public key {pub}" if pub.is_file() else ""
    return OK, f"{path} (ECDSA {key.curve.name}, mode {mode:04o}{extra})"


def probe_tls(host: str, port: int, ca_file: Path, timeout_s: float = 10.0) -> str:
    """Open a TLS connection to ``host:port`` verified with ``ca_file``; describe the server.

    Raises
    ------
    TLSProbeError
        Naming the failure (name resolution, refused, timeout, certificate) and what to check.

    """
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                cert = tls.getpeercert() or {}
                version = tls.version()
    except socket.gaierror as exc:
        raise TLSProbeError(f"cannot resolve '{host}' ({exc}); check coordinator.address "
                            "and the site's DNS") from None
    except ConnectionRefusedError:
        raise TLSProbeError(f"{host}:{port} refused the connection; is the coordinator "
                            "running, and is the port right?") from None
    except TimeoutError:
        raise TLSProbeError(f"no answer from {host}:{port} within {timeout_s:g} s; check the "
                            "address and that the hospital firewall allows outbound "
                            f"connections to port {port}") from None
    except ssl.SSLCertVerificationError as exc:
        raise TLSProbeError(
            f"TLS certificate check failed ({exc.verify_message}): "
            + certificate_failure_hint(exc.verify_code, host, ca_file)
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSProbeError(f"TLS connection to {host}:{port} failed: {exc}") from None
    subject = ", ".join("=".join(kv) for rdn in cert.get("subject", ()) for kv in rdn)
    expires = cert.get("notAfter", "?")
    return f"{host}:{port} ({version}, certificate {subject or '?'}, expires {expires})"


#: OpenSSL's X509_V_ERR_* codes (``ssl.SSLCertVerificationError.verify_code``)
_NOT_YET_VALID, _EXPIRED = 9, 10
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64
_WRONG_CA = frozenset({
    2,   # unable to get issuer certificate
    7,   # certificate signature failure
    18,  # self-signed certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
})


def certificate_failure_hint(verify_code: int, host: str, ca_file: Path) -> str:
    """Say what to do about a failed coordinator-certificate check, from OpenSSL's code.

    Parameters
    ----------
    verify_code : int
        ``ssl.SSLCertVerificationError.verify_code`` (OpenSSL ``X509_V_ERR_*``).
    host : str
        The coordinator name or address the site connected to.
    ca_file : Path
        The CA certificate the site verified with.

    """
    if verify_code == _EXPIRED:
        return ("a certificate in the coordinator's chain has expired (the coordinator's, "
                f"or the CA in {ca_file}); ask the coordinator to renew it "
                "(deploy/gen-certs.sh) and restart fl-server")
    if verify_code == _NOT_YET_VALID:
        return ("the coordinator's certificate is not valid yet: check this machine's clock "
                "(and the coordinator's), e.g. timedatectl / NTP")
    if verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return (f"the coordinator's certificate does not name '{host}'; connect with a name "
                "or IP in its subjectAltName, or ask the coordinator to add it")
    if verify_code in _WRONG_CA:
        return (f"the coordinator's certificate is not signed by the CA in {ca_file}; ask "
                "the coordinator for the ca.crt that signed its certificate")
    return (f"the coordinator's certificate was rejected (OpenSSL code {verify_code}); "
            f"check it against the CA in {ca_file} with 'openssl s_client -CAfile'")


def _check_state_dir(config: SiteConfig) -> tuple[str, str]:
    state = config.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".consilia-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return FAIL, f"{state} is not writable ({exc})"
    ledger = config.ledger_path
    if ledger.exists():
        # imported here: the ledger loads opacus, which --check needs only with a ledger
        from consilia.client.privacy.ledger import PrivacyLedger
        from consilia.client.privacy.ledger_file import LedgerCorruptError

        try:
            PrivacyLedger(ledger)
        except LedgerCorruptError as exc:
            return FAIL, str(exc)
        return OK, f"{state} (privacy ledger present and readable)"
    return OK, f"{state} (no privacy ledger yet)"


def _class_names(config: SiteConfig) -> list[str] | None:
    if config.class_names:
        return list(config.class_names)
    if config.data.kind == "image_folder" and config.data.root.is_dir():
        names = sorted(p.name for p in config.data.root.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
        return names if len(names) >= 2 else None
    return None


def _check_data(config: SiteConfig, report: CheckReport, decode: bool) -> None:
    names = _class_names(config)
    if names is None:
        report.add("data", FAIL, "cannot tell which labels to expect: set 'class_names' in the "
                   "site config (the labels used in the labels CSV)")
        return
    try:
        data = scan_site_data(config.data, names, decode=decode)
    except DataSourceError as exc:
        report.add("data", FAIL, str(exc))
        return
    try:
        where = f"; full report: {data.write_json(config.state_dir / DATA_REPORT_FILE)}"
    except OSError as exc:
        where = ""
        data.notes.append(f"the full report could not be written to the state directory ({exc})")
    report.data_text = data.to_text()
    counts = ", ".join(f"{k}: {v}" for k, v in data.counts.items())
    if data.n_usable == 0:
        report.add("data", FAIL, f"no usable image ({config.data.describe()}){where}")
    elif data.empty_classes or data.n_problems:
        issues = []
        if data.empty_classes:
            issues.append(f"no image for {', '.join(data.empty_classes)}")
        if data.n_problems:
            issues.append(f"{data.n_problems} file(s) not used (listed below)")
        report.add(
            "data", WARN,
            f"{data.n_usable} usable images ({counts}); " + "; ".join(issues) + where,
        )
    else:
        report.add("data", OK, f"{data.n_usable} usable images ({counts}){where}")


def _check_policy(config: SiteConfig, report: CheckReport) -> None:
    policy = config.policy
    if policy.allowed_models is not None:
        from consilia.common.models import MODELS  # torch: only for a model allow-list

        unknown = [m for m in policy.allowed_models if m not in MODELS]
        if unknown:
            report.add("policy", WARN, f"unknown model name(s) {', '.join(unknown)} in "
                       f"allowed_models (registered: {', '.join(MODELS.names())})")
    dp = policy.dp
    dp_text = (
        f"DP required (ε ≤ {dp.max_run_epsilon:g} per run, {dp.when_not_requested} when a run "
        f"does not ask)" if dp.required else "DP optional"
    )
    report.add("policy", OK, (
        f"models: {', '.join(policy.allowed_models) if policy.allowed_models else 'any'}; "
        f"at most {policy.max_rounds} rounds per run; {dp_text}; lifetime budget "
        f"ε={dp.budget_epsilon:g} for dataset '{config.dataset_key}'"
    ))
    stats = policy.feature_statistics
    if not stats.share:
        stats_text = "not shared (the site declines classifier calibration)"
    else:
        noised = ("Gaussian-noised (noise multiplier "
                  f"{stats.dp_noise_multiplier:g}, in the privacy ledger)"
                  if stats.dp_noise_multiplier is not None else "declined")
        stats_text = (f"shared once per run when asked, classes under {stats.min_class_count} "
                      f"images withheld; in runs trained with local DP: {noised}")
    report.add("policy", OK, f"calibration feature statistics: {stats_text}")
    if config.runtime.isolation == "subprocess":
        report.add("app approval", WARN, "runtime.isolation is 'subprocess': Flower then runs "
                   "whatever ClientApp a run's bundle names and the approved list is NOT "
                   "checked; use 'process'")
    elif not policy.approved_apps:
        report.add("app approval", WARN, "policy.approved_apps is empty: every run is refused")
    else:
        report.add("app approval", OK, "serves only " + ", ".join(policy.approved_apps))


def _check_runtime_port(config: SiteConfig) -> tuple[str, str]:
    port = config.runtime.runtime_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return WARN, (f"127.0.0.1:{port} is in use (is fl-client already running? another "
                          "site on this host needs its own runtime.runtime_port)")
    return OK, f"127.0.0.1:{port} free (local only; nothing listens to the network)"


def run_site_check(config_path: Path, decode: bool = False) -> CheckReport:
    """Run every check of ``--check`` and return the report (never raises for a bad setup).

    Parameters
    ----------
    config_path : Path
        The site YAML.
    decode : bool
        Decode every image while scanning the data (slower; finds corrupt pixel data).

    """
    report = CheckReport(Path(config_path))
    try:
        config = load_site_config(config_path)
    except ConfigError as exc:
        report.add("config", FAIL, str(exc))
        return report
    report.add("config", OK, f"site '{config.name}', coordinator {config.coordinator.address}")
    coord = config.coordinator
    ca_status, ca_detail = check_ca_certificate(coord.ca_certificate)
    report.add("CA certificate", ca_status, ca_detail)
    report.add("authentication key", *check_auth_key(coord.auth_key))
    report.add("state directory", *_check_state_dir(config))
    _check_data(config, report, decode)
    _check_policy(config, report)
    report.add("runtime port", *_check_runtime_port(config))
    if ca_status == FAIL:
        report.add("coordinator", FAIL, "not tested (no usable CA certificate)")
    else:
        try:
            detail = probe_tls(
                coord.host, coord.port, coord.ca_certificate, coord.connect_timeout_s
            )
            report.add("coordinator", OK, "TLS handshake with " + detail)
        except TLSProbeError as exc:
            report.add("coordinator", FAIL, str(exc))
    return report
