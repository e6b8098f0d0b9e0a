"""Secrets that sandbox mode generates on first start and keeps in the state directory.

They never leave the machine: the state directory is git-ignored and created readable by its owner only.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.files import create_private_file

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
    if not path.is_file():
        # Two processes starting together on a fresh state directory: one creates, both read the winner.
        create_private_file(path, msgspec.json.encode(_generate()))
    return msgspec.json.decode(path.read_bytes(), type=SandboxSecrets)
