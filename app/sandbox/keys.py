"""Secrets that sandbox mode generates on first start and keeps in the state directory.

They never leave the machine: the state directory is git-ignored and created readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SECRETS_FILE = "sandbox-secrets.json"


class SandboxSecrets(msgspec.Struct, frozen=True):
    jwt_private_key_pem: str
    jwt_public_key_pem: str
    clerk_secret_key: str
    chargebee_api_key: str
    chargebee_webhook_password: str
    stream_secret: str
    csrf_secret: str


def _generate() -> SandboxSecrets:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return SandboxSecrets(
        jwt_private_key_pem=private_pem,
        jwt_public_key_pem=public_pem,
        clerk_secret_key=f"sk_test_sandbox_{secrets.token_urlsafe(24)}",
        chargebee_api_key=f"test_sandbox_{secrets.token_urlsafe(24)}",
        chargebee_webhook_password=secrets.token_urlsafe(24),
        stream_secret=secrets.token_urlsafe(32),
        csrf_secret=secrets.token_urlsafe(32),
    )


def load_or_create_sandbox_secrets(state_dir: Path) -> SandboxSecrets:
    path = state_dir / SECRETS_FILE
    if path.is_file():
        return msgspec.json.decode(path.read_bytes(), type=SandboxSecrets)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = _generate()
    # Write-then-rename so two processes starting together never read half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(msgspec.json.encode(created))
    if path.exists():  # another process won the race: use its secrets
        tmp.unlink()
        return msgspec.json.decode(path.read_bytes(), type=SandboxSecrets)
    tmp.replace(path)
    return created
