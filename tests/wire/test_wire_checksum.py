from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import crc32c


def _reference_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_known_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI) B.4 vectors.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_accepts_memoryview_and_bytearray() -> None:
    data = b"hello, checksum world"
    assert crc32c(memoryview(data)[3:]) == crc32c(bytearray(data[3:])) == crc32c(data[3:])


@given(st.binary(max_size=100), st.integers(0, 100))
def test_matches_bitwise_reference_and_continues(data: bytes, cut: int) -> None:
    assert crc32c(data) == _reference_crc32c(data)
    cut = min(cut, len(data))
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)
