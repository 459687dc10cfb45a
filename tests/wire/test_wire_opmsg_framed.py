"""encode_op_msg(framed=True): the proxy's own messages, whose documents it framed itself,
are encoded without checking each document again, to the same bytes."""

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import DocumentSequence, LocalProtocolError, OpMsg, encode_op_msg
from tests.wire.wire_strategies import op_msgs

BODY = bson.encode({"insert": "coll", "$db": "db"})


@settings(max_examples=200)
@given(op_msgs, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_framed_gives_the_same_bytes(msg: OpMsg, request_id: int, response_to: int) -> None:
    assert encode_op_msg(msg, request_id, response_to, framed=True) == encode_op_msg(
        msg, request_id, response_to
    )


def test_framed_skips_only_the_document_checks() -> None:
    misframed = OpMsg(0, BODY, (DocumentSequence("documents", (b"junk",)),))
    with pytest.raises(LocalProtocolError, match="'documents'"):
        encode_op_msg(misframed, 1, 0)
    assert encode_op_msg(misframed, 1, 0, framed=True).endswith(b"documents\x00junk")
    # Flags and identifiers are still checked: they are not documents.
    with pytest.raises(LocalProtocolError, match="uint32"):
        encode_op_msg(OpMsg(-1, BODY), 1, 0, framed=True)
    with pytest.raises(LocalProtocolError, match="NUL byte"):
        encode_op_msg(OpMsg(0, BODY, (DocumentSequence("a\x00b", ()),)), 1, 0, framed=True)
