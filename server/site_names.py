"""Which site sent a reply: the name in its ``site`` record, remembered per node for errors.

An error reply (a refusal, a failure) carries no content, so no site name: it is named after
what the same node called itself in an earlier reply, else ``node-<id>``.
"""

from __future__ import annotations

from flwr.app import Message

from consilia.common.constants import MessageKey, SiteRecordKey

__all__ = ["SiteNames", "site_name"]


def site_name(msg: Message) -> str:
    """Return the replying site's name (``node-<id>`` when the reply carries none)."""
    site = msg.content.config_records.get(MessageKey.SITE.value) if msg.has_content() else None
    if site is not None and SiteRecordKey.NAME.value in site:
        return str(site[SiteRecordKey.NAME.value])
    return f"node-{msg.metadata.src_node_id}"


class SiteNames:
    """Site names learnt from the replies of one run (node id -> name)."""

    def __init__(self) -> None:
        self._by_node: dict[int, str] = {}

    def name_of(self, msg: Message) -> str:
        """Return the site name of a reply; an error reply gets the name its node used before."""
        name = site_name(msg)
        node = int(msg.metadata.src_node_id)
        if msg.has_error() or not msg.has_content():
            return self._by_node.get(node, name)
        self._by_node[node] = name
        return name
