"""Flower messages in their wire format (protobuf), for tests, audits and in-process runs.

Flower 1.42 serialises a ``Message`` with ``flwr.common.serde.message_to_proto`` /
``message_from_proto`` (internal). :func:`over_the_wire` returns a message as its receiver
sees it; :func:`message_to_bytes` / :func:`message_from_bytes` store one in a file.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from consilia.common.flower.compat import require_supported_flower

require_supported_flower()

__all__ = ["message_from_bytes", "message_to_bytes", "over_the_wire", "set_message_id"]


def over_the_wire(msg: Message) -> Message:
    """Return the message as the receiver sees it (serialised and parsed back)."""
    return message_from_proto(message_to_proto(msg))


def message_to_bytes(msg: Message) -> bytes:
    """Serialise a message as Flower transmits it (protobuf ``Message``)."""
    return bytes(message_to_proto(msg).SerializeToString())


def message_from_bytes(data: bytes) -> Message:
    """Parse a message written by :func:`message_to_bytes`."""
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def set_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id Flower's transport would (its metadata has no public setter)."""
    msg.metadata.__dict__["_message_id"] = message_id
