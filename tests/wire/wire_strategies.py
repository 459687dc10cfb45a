"""Hypothesis strategies shared by the wire codec tests."""

from __future__ import annotations

import bson
from hypothesis import strategies as st

from proxy.wire import CHECKSUM_PRESENT, EXHAUST_ALLOWED, MORE_TO_COME, DocumentSequence, OpMsg

_keys = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    min_size=1,
    max_size=8,
)
_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.binary(max_size=20),
)
dicts = st.dictionaries(_keys, _values, max_size=4)
documents = dicts.map(bson.encode)
command_documents = st.builds(
    lambda name, rest: bson.encode({name: 1, **{k: v for k, v in rest.items() if k != name}}),
    _keys,
    dicts,
)
int32s = st.integers(min_value=-(2**31), max_value=2**31 - 1)
flags = st.sets(st.sampled_from([CHECKSUM_PRESENT, MORE_TO_COME, EXHAUST_ALLOWED])).map(sum)
sequences = st.builds(
    DocumentSequence,
    st.sampled_from(["documents", "updates", "deletes", "x", "ünï"]),
    st.lists(documents, max_size=4).map(tuple),
)
op_msgs = st.builds(OpMsg, flags, command_documents, st.lists(sequences, max_size=3).map(tuple))
