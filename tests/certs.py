"""Test certificates made with the openssl CLI: a CA, and server or client certificates it signs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # P-256: much faster to make than RSA


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Pair:
    """A self-signed CA valid for two days."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl("req", "-x509", *_KEY, "-nodes", "-keyout", pair.key, "-out", pair.cert,
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def make_cert(directory: Path, ca: Pair, name: str, *, cn: str, san: str = "",
              client: bool = False, key_password: str = "") -> Pair:
    """A certificate for ``cn`` (and ``san``, e.g. ``IP:127.0.0.1,DNS:localhost``) signed by ``ca``; for client
    authentication when ``client``; its key encrypted with ``key_password`` when given."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _openssl("req", *_KEY, "-nodes", "-keyout", pair.key, "-out", csr, "-subj", f"/CN={cn}")
    lines = [f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-out", pair.cert,
             "-days", "2", "-extfile", ext)
    if key_password:
        plain = directory / f"{name}.plain.key"
        pair.key.rename(plain)
        _openssl("pkey", "-in", plain, "-out", pair.key, "-aes256", "-passout", f"pass:{key_password}")
        plain.unlink()
    return pair
