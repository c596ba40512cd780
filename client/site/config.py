"""A hospital's own configuration (``fl-client --site site.yaml``): the schema and its loader.

The file belongs to the site: the coordinator never sees it. It names the site, how to reach
the coordinator (address, CA certificate, the site's authentication key), where the data are
(:data:`consilia.client.site.data_sources.config.DataSourceConfig`), how much of it to hold
out locally, resource limits, a local state directory (logs, decoded-image cache, privacy
ledger) and the **site policy**: which model architectures, how many rounds, whether
differential privacy is required and how strong it must be, the site's lifetime privacy
budget, and which app bundles (FABs) the site agrees to serve.

Loading is strict (unknown keys are errors) and every error names the file and the field.
Relative paths are resolved against the folder of the YAML file. Parse the file once per
process, at its entry point (:func:`load_site_config`), and pass the :class:`SiteConfig` down.
What the policy decides lives in :mod:`consilia.client.site.policy`; building the site's data
and trainer in :mod:`consilia.client.site.assembly`.

Importing this module is light (no torch).

Example (every optional field shown with its default, except where marked)::

    name: st-mary                         # reported to the coordinator
    coordinator:
      address: fl.example.org:9092        # the coordinator's SuperLink, HOST:PORT
      ca_certificate: certs/ca.crt        # relative paths: from this file's folder
      auth_key: certs/supernode.key       # OpenSSH ECDSA key; chmod 600; .pub registered
      connect_timeout_s: 10
    data:                                 # kind: dicom | image_folder
      kind: dicom
      root: /data/chest-xray
      labels_csv: labels.csv              # relative to root
      key: relative_path                  # or sop_instance_uid
      path_column: path
      label_column: label
    class_names: [normal, pneumonia]      # (not a default) labels of this site's data
    validation: {fraction: 0.2, seed: 0}  # local held-out split, stratified
    resources: {threads: 4, max_batch_size: 256}   # (threads default: auto)
    state_dir: /var/lib/consilia/st-mary  # logs, image cache, privacy ledger
    policy:
      allowed_models: [cnn, densenet121]  # (default: any registered model)
      max_rounds: 100
      dp:
        required: true                    # (default: false)
        max_run_epsilon: 8.0
        when_not_requested: enforce       # or refuse
        budget_epsilon: 10.0              # lifetime, per dataset
        delta: 1.0e-5                     # (default: min(1e-5, 1/(10 n)))
        max_grad_norm: 1.0
        accountant: rdp                   # or prv; every DP run is accounted with it
        dataset_key: chest-xray-2024      # (default: the site name)
      feature_statistics:                 # classifier calibration after the last round
        share: true                       # send per-class feature sums (no per-image value)
        min_class_count: 20               # withhold classes rarer than this here
        dp_noise_multiplier: 5.0          # local-DP runs: noised, in the ledger; null: decline
      approved_apps: ["consilia/consilia-run==0.1.0"]   # default: the installed version
    runtime:
      isolation: process                  # subprocess = Flower's default (no approval)
      runtime_port: 9094                  # 127.0.0.1 only
      task_poll_interval_s: 0.2          # idle pace of the ClientApp process
      superlink_poll_interval_s: 1.0     # idle pace of the SuperNode
      active_poll_interval_s: 0.1        # both, during a run
      active_window_s: 60
      max_backoff_s: 300
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from consilia.client.privacy.accountants import SiteAccountant
from consilia.client.site.data_sources.config import DataSourceConfig
from consilia.common.config import (
    ConfigError,
    StrictModel,
    format_validation_error,
    load_config_file,
)
from consilia.common.flower.app_project import APP_PUBLISHER

__all__ = [
    "APP_NAME",
    "CoordinatorConfig",
    "DPPolicy",
    "FeatureStatisticsPolicy",
    "ResourceLimits",
    "RuntimeSettings",
    "SiteConfig",
    "SitePolicy",
    "ValidationSplit",
    "default_approved_apps",
    "installed_version",
    "load_site_config",
]

log = logging.getLogger("consilia.site")

#: ``project.name`` of the app bundle the coordinator submits (see common/flower/app_project.py).
APP_NAME = "consilia-run"

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_APP_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+==[A-Za-z0-9_.*+!-]+$")


def installed_version() -> str:
    """Return the version of the installed Consilia package (what this site runs)."""
    try:
        return metadata.version("consilia")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0.0.0"


def default_approved_apps() -> list[str]:
    """Return the bundle identity the installed Consilia serves (``consilia/consilia-run==V``)."""
    return [f"{APP_PUBLISHER}/{APP_NAME}=={installed_version()}"]


# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------


class CoordinatorConfig(StrictModel):
    """How the site reaches the coordinator (outbound TLS only; nothing listens at the site)."""

    address: str = Field(description="the coordinator's SuperLink address, HOST:PORT")
    ca_certificate: Path = Field(description="PEM CA certificate that signed the coordinator's")
    auth_key: Path = Field(
        description="the site's OpenSSH ECDSA private key, registered at the coordinator "
        "(its .pub file is what the coordinator registers); must not be group/world readable"
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.strip().rpartition(":")
        if "://" in value:
            raise ValueError("give HOST:PORT without a scheme (no https://)")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. fl.example.org:9092")
        return value.strip()

    @property
    def host(self) -> str:
        """Host part of :attr:`address` (IPv6 brackets removed)."""
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of :attr:`address`."""
        return int(self.address.rpartition(":")[2])


class ValidationSplit(StrictModel):
    """The site's local held-out split (stratified by class, seeded, never leaves the site)."""

    fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0


class ResourceLimits(StrictModel):
    """What the site lends to training."""

    threads: int | None = Field(None, ge=1, le=1024, description="torch threads (None = auto)")
    max_batch_size: int = Field(
        256, ge=1, le=65536, description="a run asking for larger batches is trained with this"
    )


class DPPolicy(StrictModel):
    """The site's differential-privacy rules (local DP-SGD with Opacus)."""

    required: bool = Field(False, description="train only with local DP")
    max_run_epsilon: float = Field(
        8.0, gt=0, description="weakest per-run guarantee accepted (a run asking for a "
        "larger epsilon is refused when DP is required); also the site's own DP strength"
    )
    when_not_requested: Literal["enforce", "refuse"] = Field(
        "enforce", description="DP required but the run did not ask for local DP: apply the "
        "site's own DP (enforce) or refuse the run"
    )
    budget_epsilon: float = Field(
        10.0, gt=0, description="lifetime epsilon budget per dataset (privacy ledger); the "
        "coordinator cannot raise it"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="the site's delta (None: min(1e-5, 1/(10 n)))"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="clipping norm of the site's own DP")
    max_noise_multiplier: float = Field(
        10.0, gt=0, description="the least useful privacy level this site trains at: a run "
        "whose noise multiplier (for the budget left, or for its own request) would exceed it "
        "is refused, and the coordinator is told why (a spent budget stops the site)"
    )
    accountant: SiteAccountant = Field(
        "rdp", description="the accountant every DP run at this site is accounted with, "
        "whatever the run asks: rdp or prv (upper bounds); gdp is refused"
    )
    dataset_key: str | None = Field(
        None, min_length=1, description="name of this data in the privacy ledger (default: "
        "the site name); keep it stable when images are added"
    )


class FeatureStatisticsPolicy(StrictModel):
    """Whether the site answers the coordinator's classifier-calibration request.

    The answer is, per class, the number of images and the sum and outer-product sum of the
    global model's penultimate features (a few dozen numbers per class; never a per-image
    value). A site training the run with local DP sends them only through the Gaussian
    mechanism (features clipped to the coordinator's bound, noise multiplier
    ``dp_noise_multiplier``), accounted in its privacy ledger and planned into the run's
    budget from the first round; ``dp_noise_multiplier: null`` makes it decline instead.
    """

    share: bool = Field(True, description="send per-class feature statistics at the end of a "
                        "run (classifier calibration)")
    min_class_count: int = Field(20, ge=1, description="withhold every class with fewer images "
                                 "than this at the site (exact statistics, sites without DP)")
    dp_noise_multiplier: float | None = Field(
        5.0, gt=0, description="Gaussian noise multiplier of the statistics a site training "
        "with local DP sends; planned into the run's epsilon from its first round (at 5 the "
        "release costs about 0.07 of an epsilon-8 run); null: such a site declines"
    )


class SitePolicy(StrictModel):
    """What the site agrees to take part in."""

    allowed_models: list[str] | None = Field(
        None, description="registered architectures this site trains (None = any)"
    )
    max_rounds: int = Field(100, ge=1, le=100000)
    dp: DPPolicy = DPPolicy()
    feature_statistics: FeatureStatisticsPolicy = FeatureStatisticsPolicy()
    approved_apps: list[str] = Field(
        default_factory=default_approved_apps,
        description="app bundles this site serves: 'publisher/name==version' (version may "
        "use * wildcards) or 'sha256:<64 hex>' (the bundle's hash)",
    )

    @field_validator("approved_apps")
    @classmethod
    def _approved_syntax(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            entry = item.strip()
            if entry.startswith("sha256:"):
                digest = entry.removeprefix("sha256:").lower()
                if not _HEX64.match(digest):
                    raise ValueError(f"'{item}': a hash entry is 'sha256:' + 64 hex digits")
                entry = "sha256:" + digest
            elif not _APP_ID.match(entry):
                raise ValueError(
                    f"'{item}': expected 'publisher/name==version' (e.g. "
                    f"'{default_approved_apps()[0]}') or 'sha256:<64 hex>'"
                )
            out.append(entry)
        return out


class RuntimeSettings(StrictModel):
    """How ``fl-client`` runs the Flower SuperNode and the site's ClientApp process."""

    isolation: Literal["process", "subprocess"] = Field(
        "process", description="process: the site's own long-lived ClientApp process that "
        "runs only the installed Consilia code and only approved bundles (recommended); "
        "subprocess: Flower's default, a fresh process per task running whatever ClientApp "
        "the bundle names (no approval check; for benchmarks only)"
    )
    runtime_port: int = Field(
        9094, ge=1024, le=65535, description="local port of the SuperNode's runtime API "
        "(bound to 127.0.0.1; one per site on a host)"
    )
    task_poll_interval_s: float = Field(
        0.2, ge=0.01, le=60, description="how often the ClientApp process asks for a task"
    )
    superlink_poll_interval_s: float = Field(
        1.0, ge=0.2, le=60, description="idle wait between the SuperNode's polls of the "
        "coordinator (Flower's default: 3 s); smaller answers rounds faster"
    )
    active_poll_interval_s: float = Field(
        0.1, ge=0.02, le=60, description="while a run is active (a task handled in the last "
        "active_window_s), the SuperNode polls the coordinator and the ClientApp process "
        "polls the SuperNode this often; rounds then start within ~0.1 s"
    )
    active_window_s: float = Field(
        60.0, ge=0, le=3600, description="how long after the last task the site keeps "
        "polling at the active pace before falling back to the idle intervals"
    )
    max_backoff_s: float = Field(300.0, ge=1, description="longest wait between reconnects")


class SiteConfig(StrictModel):
    """A hospital site: identity, coordinator, data, resources, state and policy."""

    name: str = Field(description="the site's name, reported to the coordinator")
    coordinator: CoordinatorConfig
    data: DataSourceConfig
    class_names: list[str] | None = Field(
        None, min_length=2, description="labels this site's data uses (for --check; a run's "
        "task decides the label space for training). Image folders default to the sub-folders"
    )
    validation: ValidationSplit = ValidationSplit()
    resources: ResourceLimits = ResourceLimits()
    state_dir: Path = Field(description="persistent folder: logs, image cache, privacy ledger")
    policy: SitePolicy = SitePolicy()
    runtime: RuntimeSettings = RuntimeSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError(
                "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _class_names_unique(self) -> SiteConfig:
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names contains duplicates")
        return self

    # -- derived paths ------------------------------------------------------------------

    @property
    def dataset_key(self) -> str:
        """Name of the site's data in the privacy ledger."""
        return self.policy.dp.dataset_key or self.name

    @property
    def log_dir(self) -> Path:
        """``<state_dir>/logs``."""
        return self.state_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        """``<state_dir>/cache`` (decoded images)."""
        return self.state_dir / "cache"

    @property
    def ledger_path(self) -> Path:
        """``<state_dir>/privacy-ledger.json``."""
        return self.state_dir / "privacy-ledger.json"

    @property
    def rounds_log(self) -> Path:
        """``<state_dir>/logs/rounds.jsonl``: one line per task the site took part in."""
        return self.log_dir / "rounds.jsonl"


def _absolute(value: Path, base: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else base / value


def _resolve_paths(config: SiteConfig, base: Path) -> None:
    """Make the site's file paths absolute, relative ones taken from ``base``.

    A DICOM source's ``labels_csv`` keeps its own rule (relative to the data root).
    """
    coord = config.coordinator
    coord.ca_certificate = _absolute(coord.ca_certificate, base)
    coord.auth_key = _absolute(coord.auth_key, base)
    config.state_dir = _absolute(config.state_dir, base)
    config.data.root = _absolute(config.data.root, base)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site YAML file.

    Parameters
    ----------
    path : str or Path
        The site configuration; relative paths inside it are resolved against its folder.

    Returns
    -------
    SiteConfig
        The validated configuration with absolute paths.

    Raises
    ------
    ConfigError
        With the file name and one line per bad field (what is wrong, what is allowed).

    """
    path = Path(path).expanduser().resolve()
    data = load_config_file(path)
    try:
        config = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"site config {path}")) from None
    _resolve_paths(config, path.parent)
    return config
