"""Render the coordinator's nginx reverse-proxy configuration (``deploy/nginx/``).

Open-source Flower serves the Fleet API (sites), the Control API (operator: register sites,
submit runs) and the Runtime API (the coordinator's own ServerApp) on one port, and the
Control API is unauthenticated. The proxy publishes ``/v1/fleet/*`` to everyone (the
SuperLink still demands a registered site key), ``/v1/control/*`` only to the operators'
addresses, and nothing else; the SuperLink itself listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ProxyConfigError", "operators_allow_file", "render_proxy_config"]

_PLACEHOLDERS = (
    "CONSILIA_PROXY_LISTEN",
    "CONSILIA_SUPERLINK",
    "CONSILIA_SUPERLINK_TLS_NAME",
    "CONSILIA_CERTS_DIR",
    "CONSILIA_OPERATORS_ALLOW",
)


class ProxyConfigError(ValueError):
    """A missing template value or a bad operator address."""


def operators_allow_file(cidrs: Sequence[str]) -> str:
    """Nginx ``allow`` lines for the operators' addresses (``10.0.0.0/24``, ``192.0.2.7``).

    Raises
    ------
    ProxyConfigError
        For an address that is not an IP network, or an empty list.

    """
    lines = ["# Operator addresses allowed to use the Control API (one 'allow' per line)."]
    for raw in cidrs:
        try:
            net = ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            raise ProxyConfigError(
                f"operator address '{raw}': expected an IP address or CIDR network"
            ) from None
        lines.append(f"allow {net};")
    if len(lines) == 1:
        raise ProxyConfigError("give at least one operator address (--operators)")
    return "\n".join(lines) + "\n"


def render_proxy_config(template: Path, values: dict[str, str]) -> str:
    """Fill the ``${CONSILIA_*}`` placeholders of the nginx template.

    nginx's own ``$variables`` are left alone.

    Raises
    ------
    ProxyConfigError
        If a placeholder has no value.

    """
    missing = [name for name in _PLACEHOLDERS if not values.get(name)]
    if missing:
        raise ProxyConfigError(f"no value for {', '.join(missing)}")
    text = string.Template(Path(template).read_text()).safe_substitute(values)
    if "${CONSILIA_" in text:
        raise ProxyConfigError(f"{template}: unknown placeholder left in the template")
    return text
