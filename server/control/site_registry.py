"""The coordinator's list of registered sites: name, node id, public key and its fingerprint.

The SuperLink stores the keys it lets join; Flower's node list shows node ids only, so the
coordinator keeps the human names here (``<state>/sites.json``), with each site's public key
so that a SuperLink whose state lives in memory gets every site back when it restarts
(:func:`consilia.server.control.cli` ``start``). The file is written ``0600`` in the ``0700``
state directory: public keys only, but who may join is the coordinator's business.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from consilia.server.control.state_dir import ensure_private_dir, write_private_text

__all__ = ["SiteEntry", "SiteRegistry", "SiteRegistryError", "read_public_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ECDSA_TYPES = ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")


class SiteRegistryError(ValueError):
    """Bad site name or key, or a duplicate registration."""


@dataclass(frozen=True)
class SiteEntry:
    """One registered site."""

    name: str
    node_id: int
    fingerprint: str
    registered_at: str
    public_key: str = ""  # the OpenSSH key line, to register the site again after a restart


def read_public_key(path: Path) -> tuple[str, str]:
    """Read an OpenSSH ECDSA public key; return ``(key line, SHA256 fingerprint)``.

    Raises
    ------
    SiteRegistryError
        If the file is missing, is a private key, or is not an ECDSA public key.

    """
    path = Path(path)
    if not path.is_file():
        raise SiteRegistryError(f"{path}: public key file not found")
    text = path.read_text(errors="replace").strip()
    if "PRIVATE KEY" in text:
        raise SiteRegistryError(
            f"{path} is a PRIVATE key: never copy it off the site; send the '.pub' file"
        )
    parts = text.split()
    if len(parts) < 2 or parts[0] not in _ECDSA_TYPES:
        raise SiteRegistryError(
            f"{path}: not an OpenSSH ECDSA public key (expected a line starting with "
            f"{' / '.join(_ECDSA_TYPES)}); create one at the site with "
            "'ssh-keygen -t ecdsa -b 384 -N \"\" -f supernode.key'"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise SiteRegistryError(f"{path}: the key data is not valid base64") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return " ".join(parts[:2]), f"SHA256:{digest}"


class SiteRegistry:
    """Site names known to this coordinator, stored as JSON in ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> list[SiteEntry]:
        """All registered sites, in registration order."""
        if not self.path.is_file():
            return []
        data = json.loads(self.path.read_text())
        return [SiteEntry(**item) for item in data.get("sites", [])]

    def _save(self, entries: list[SiteEntry]) -> None:
        ensure_private_dir(self.path.parent)
        write_private_text(self.path, json.dumps({"sites": [asdict(e) for e in entries]},
                                                 indent=2))

    def check_new(self, name: str, fingerprint: str) -> None:
        """Raise unless ``name`` is valid and neither it nor the key is registered yet."""
        if not _NAME.match(name):
            raise SiteRegistryError(
                f"site name '{name}': use 1-64 letters, digits, '.', '_' or '-'"
            )
        for entry in self.load():
            if entry.name == name:
                raise SiteRegistryError(
                    f"site '{name}' is already registered (node {entry.node_id}); "
                    f"'fl-server unregister-site {name}' first to replace its key"
                )
            if entry.fingerprint == fingerprint:
                raise SiteRegistryError(
                    f"this key ({fingerprint}) is already registered as site '{entry.name}'"
                )

    def add(self, name: str, node_id: int, fingerprint: str, public_key: str = "") -> SiteEntry:
        """Record a site the SuperLink has accepted."""
        entry = SiteEntry(name, int(node_id), fingerprint,
                          datetime.now(UTC).isoformat(timespec="seconds"), public_key)
        self._save([*self.load(), entry])
        return entry

    def set_node_id(self, name: str, node_id: int) -> None:
        """Record the node id the SuperLink gave ``name`` when it was registered again."""
        self._save([replace(e, node_id=int(node_id)) if e.name == name else e
                    for e in self.load()])

    def remove(self, name: str) -> SiteEntry:
        """Forget a site; return its entry."""
        entries = self.load()
        for entry in entries:
            if entry.name == name:
                self._save([e for e in entries if e.name != name])
                return entry
        known = ", ".join(e.name for e in entries) or "none"
        raise SiteRegistryError(f"no site named '{name}' (registered: {known})")

    def by_node_id(self) -> dict[int, SiteEntry]:
        """Sites keyed by node id."""
        return {e.node_id: e for e in self.load()}
