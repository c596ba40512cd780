"""Every key that crosses the wire (Flower messages, run/node config), in one place."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DP_ACCOUNTANT_METRIC_PREFIX",
    "CalibrationKey",
    "ConfigKey",
    "MessageKey",
    "MetricKey",
    "NodeConfigKey",
    "QueryName",
    "RunConfigKey",
    "SiteRecordKey",
]


class RunConfigKey(StrEnum):
    """Keys of Flower's ``context.run_config`` (owned by the coordinator)."""

    CONFIG_JSON = "consilia-config-json"
    RUN_DIR = "consilia-run-dir"
    #: deployment: a token the coordinator resolves to the run directory (sites never see
    #: the coordinator's path; see consilia.server.control.run_dirs)
    RUN_DIR_TOKEN = "consilia-run-dir-token"
    SIM_SITES_DIR = "consilia-sim-sites-dir"
    #: simulations: torch threads of each simulated site
    SIM_THREADS = "consilia-sim-threads"


class NodeConfigKey(StrEnum):
    """Keys of Flower's ``context.node_config`` (owned by the site)."""

    SITE_CONFIG = "site-config"
    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"


class MessageKey(StrEnum):
    """Record names inside a Flower ``Message`` content."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    SITE = "site"
    #: ConfigRecord of a train reply: the site's evaluation of the model it received
    EVALUATION = "received-model-evaluation"


class ConfigKey(StrEnum):
    """Keys of the ``ConfigRecord`` the coordinator sends with each instruction."""

    SERVER_ROUND = "server-round"
    TRAIN_JSON = "train-json"
    MODEL_JSON = "model-json"
    TASK_JSON = "task-json"
    DP_JSON = "dp-json"
    RUN_NAME = "run-name"
    SEED = "seed"
    TOTAL_ROUNDS = "total-rounds"
    PROXIMAL_MU = "proximal-mu"
    QUERY = "consilia-query"
    CALIBRATION = "calibration"
    FEATURE_CLIP_NORM = "feature-clip-norm"
    #: train messages: evaluate the received global model before training on it
    EVALUATE_RECEIVED = "evaluate-received-model"


class SiteRecordKey(StrEnum):
    """Keys of the ``ConfigRecord`` ``MessageKey.SITE`` a site sends with every reply."""

    NAME = "name"


class QueryName(StrEnum):
    """What a ``query`` message asks a site for (``ConfigKey.QUERY``)."""

    FEATURE_STATS = "feature-stats"


class MetricKey(StrEnum):
    """Scalar metric names that sites report (``MetricRecord``)."""

    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = "train-loss"
    EVAL_LOSS = "eval-loss"
    ACCURACY = "accuracy"
    BALANCED_ACCURACY = "balanced-accuracy"
    AUC = "auc"
    F1 = "f1"
    SITE_INDEX = "site-index"
    EPSILON = "epsilon"
    DELTA = "delta"
    TRAIN_SECONDS = "train-seconds"
    DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
    #: 1.0 when the site trained with DP-SGD this round, else 0.0
    DP_ENABLED = "dp-enabled"


#: Prefix of the train-reply metric naming the accountant a DP site used (``dp-accountant-rdp``,
#: value 1.0): one key per accountant, so Flower's metric aggregation keeps them apart.
DP_ACCOUNTANT_METRIC_PREFIX = "dp-accountant-"


class CalibrationKey(StrEnum):
    """Array names of a site's classifier-calibration reply (``QueryName.FEATURE_STATS``)."""

    COUNTS = "counts"
    SUMS = "sums"
    OUTER_SUMS = "outer-sums"
