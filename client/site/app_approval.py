"""Which app bundles (FABs) a site agrees to serve, and why it refuses the others.

A Flower SuperNode executes whatever bundle a run brings. A Consilia site instead runs its
own long-lived ClientApp process (:mod:`consilia.client.site.worker`) that executes only the
Consilia code installed at the site, and only for runs whose bundle is on the site's approved
list (``policy.approved_apps`` of the site config):

- ``publisher/name==version``: the bundle's declared identity (``[tool.flwr.app] publisher``,
  ``[project] name`` and ``version`` of its ``pyproject.toml``); ``*`` wildcards are allowed
  in the version (``consilia/consilia-run==0.1.*``);
- ``sha256:<64 hex>``: exactly one bundle (Flower's FAB hash is the SHA-256 of its bytes).

Independently of the list, a bundle must ask for the Consilia ClientApp
(``[tool.flwr.app.components] clientapp = "consilia.client.app:app"``): the site never loads
code from a bundle, so a bundle naming another ClientApp cannot run here and is refused.
Python files inside an approved bundle are never imported at the site (they are listed in the
log).

No Flower imports: the worker hands in the bundle's bytes and hash.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass, field

from consilia.common.flower.app_project import CLIENTAPP_REF

__all__ = ["AppIdentity", "AppNotApproved", "check_app_approved", "identity_from_fab"]


class AppNotApproved(RuntimeError):  # noqa: N818 (reads as the refusal it is)
    """The run's app bundle is not one this site serves.

    Attributes
    ----------
    reason : str
        Plain-language reason (also the message).

    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AppIdentity:
    """What a bundle says about itself, plus its verified hash."""

    fab_hash: str
    fab_id: str = ""
    version: str = ""
    clientapp: str = ""
    code_files: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """Return ``publisher/name==version (sha256:…)`` for logs and refusals."""
        ident = f"{self.fab_id or '?'}=={self.version or '?'}"
        return f"{ident} (sha256:{self.fab_hash})"


def identity_from_fab(content: bytes, declared_hash: str | None = None) -> AppIdentity:
    """Read a bundle's identity from its bytes (zip with ``pyproject.toml``).

    Parameters
    ----------
    content : bytes
        The FAB as received.
    declared_hash : str, optional
        The hash the SuperLink announced; it must equal the SHA-256 of ``content``.

    Returns
    -------
    AppIdentity
        Identity and hash (computed here, never trusted from the sender).

    Raises
    ------
    AppNotApproved
        If the bytes do not match the announced hash or are not a readable bundle.

    """
    digest = hashlib.sha256(content).hexdigest()
    if declared_hash is not None and declared_hash.lower() != digest:
        raise AppNotApproved(
            f"the app bundle's content (sha256:{digest}) does not match its announced hash "
            f"{declared_hash}"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = archive.namelist()
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppNotApproved(
            f"the app bundle (sha256:{digest}) is not a readable Flower app bundle ({exc})"
        ) from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    proj = project.get("project", {})
    publisher, name = str(app.get("publisher", "")), str(proj.get("name", ""))
    return AppIdentity(
        fab_hash=digest,
        fab_id=f"{publisher}/{name}" if publisher and name else "",
        version=str(proj.get("version", "")),
        clientapp=str(app.get("components", {}).get("clientapp", "")),
        code_files=tuple(sorted(n for n in names if n.endswith(".py"))),
    )


def _matches(entry: str, identity: AppIdentity) -> bool:
    if entry.startswith("sha256:"):
        return entry.removeprefix("sha256:") == identity.fab_hash
    fab_id, _, version = entry.partition("==")
    return fab_id == identity.fab_id and fnmatch.fnmatchcase(identity.version, version)


def check_app_approved(
    approved: list[str], identity: AppIdentity, site_name: str = "this site"
) -> None:
    """Refuse a bundle that is not approved or does not ask for the installed ClientApp.

    Parameters
    ----------
    approved : list of str
        ``policy.approved_apps`` (validated syntax: ``publisher/name==version`` or
        ``sha256:<hex>``).
    identity : AppIdentity
        The run's bundle.
    site_name : str
        Named in the reason.

    Raises
    ------
    AppNotApproved
        With a reason naming the bundle, what the site accepts and how to approve it.

    """
    if identity.clientapp != CLIENTAPP_REF:
        raise AppNotApproved(
            f"site '{site_name}' runs only its installed ClientApp '{CLIENTAPP_REF}'; the app "
            f"bundle {identity.describe()} asks for '{identity.clientapp or '(none)'}'"
        )
    if not any(_matches(entry, identity) for entry in approved):
        raise AppNotApproved(
            f"site '{site_name}' has not approved the app bundle {identity.describe()} "
            f"(approved: {', '.join(approved) or 'none'}); the site's IT can add "
            f"'{identity.fab_id or '?'}=={identity.version or '?'}' or "
            f"'sha256:{identity.fab_hash}' to policy.approved_apps"
        )
