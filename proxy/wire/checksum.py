"""CRC-32C (Castagnoli), the checksum of OP_MSG's checksumPresent flag.

No maintained CRC-32C package is a dependency, and checksums are rare on the
wire (drivers do not send them unless asked), so this is pure Python:
slicing-by-8 over eight 256-entry tables, which handles 8 bytes per loop turn.
"""

from __future__ import annotations

import sys

__all__ = ["crc32c"]

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_tables() -> tuple[tuple[int, ...], ...]:
    base = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        base.append(crc)
    tables = [base]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ base[prev[n] & 0xFF] for n in range(256)])
    return tuple(tuple(t) for t in tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _make_tables()
_LITTLE_ENDIAN = sys.byteorder == "little"


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC-32C of ``data``, continuing from ``crc`` (a previous result)."""
    view = memoryview(data).cast("B")
    crc ^= 0xFFFFFFFF
    n = len(view)
    whole = n - n % 8
    t0, t1, t2, t3, t4, t5, t6, t7 = _T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7
    if whole:
        # Little-endian 64-bit words: the low 32 bits fold into the running CRC.
        if _LITTLE_ENDIAN:
            for word in view[:whole].cast("Q"):
                lo = (word & 0xFFFFFFFF) ^ crc
                hi = word >> 32
                crc = (
                    t7[lo & 0xFF]
                    ^ t6[(lo >> 8) & 0xFF]
                    ^ t5[(lo >> 16) & 0xFF]
                    ^ t4[lo >> 24]
                    ^ t3[hi & 0xFF]
                    ^ t2[(hi >> 8) & 0xFF]
                    ^ t1[(hi >> 16) & 0xFF]
                    ^ t0[hi >> 24]
                )
        else:
            for byte in view[:whole]:
                crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    for byte in view[whole:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
