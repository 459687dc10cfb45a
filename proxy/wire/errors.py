"""The wire codec's errors: one root, split by whose fault the bad bytes are."""

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Root of every error the wire codec raises."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the wire protocol.

    Malformed, truncated or oversized frames, a bad checksum, a bad BSON length
    prefix, an unknown compressor: the connection that sent them cannot go on.
    """


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the wire protocol cannot carry."""
