"""A self-signed certificate for 127.0.0.1/localhost, made at test time with the openssl
command-line tool (no Python dependency beyond the standard library)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertPair", "make_self_signed"]


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def make_self_signed(folder: Path, name: str = "server") -> CertPair:
    """A certificate that is its own CA, valid for localhost and 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make a test certificate")
    folder.mkdir(parents=True, exist_ok=True)
    pair = CertPair(folder / f"{name}.pem", folder / f"{name}.key")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            str(pair.key),
            "-out",
            str(pair.cert),
        ],
        check=True,
        capture_output=True,
    )
    return pair
