"""The local fleet's token issuer: an RSA signing key in `<base>/auth/`, its OIDC discovery document and JWKS served
on loopback, and tokens minted for the services and the local user (`fleet up`, `fleet token`).

The services check these tokens exactly as they check a real identity provider's (services/common/auth.py: OIDC
discovery from AUTH_ISSUER, then the JWKS). In Kubernetes the issuer is the organisation's (deploy/k8s/README.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"
AUDIENCE = "swe-ai-fleet"
ALGORITHM = "RS256"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 thumbprint of an RSA public JWK: its key id."""
    canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


class SigningKey:
    """One RSA key: the private half signs, the public half is published."""

    def __init__(self, private: rsa.RSAPrivateKey) -> None:
        self.private = private
        public = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        self.kid = thumbprint(public)
        self.jwk = {**public, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key in `path` (PEM), created (mode 0600) when absent."""
        if path.exists():
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise ValueError(f"{path} is not an RSA private key")
            return cls(private)
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = key.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return key


def mint(
    key: SigningKey,
    issuer: str,
    subject: str,
    roles: Iterable[str],
    *,
    ttl_seconds: float = 3600,
    email: str = "",
    audience: str = AUDIENCE,
    **claims: Any,
) -> str:
    """A signed access token for `subject` with `roles` (the `roles` claim), valid from now for `ttl_seconds`."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
        "roles": sorted(set(roles)),
        **({"email": email} if email else {}),
        **claims,
    }
    return jwt.encode(body, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})


class LocalIssuer:
    """Serves discovery + JWKS on loopback and mints tokens; `with LocalIssuer(dir) as issuer:` stops the server."""

    def __init__(self, directory: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = Path(directory)
        self.key = SigningKey.load_or_create(self.directory / "signing-key.pem")
        self.published = [self.key]  # what the JWKS lists (a rotation adds keys)
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == DISCOVERY_PATH:
                    body = issuer.discovery()
                elif self.path == JWKS_PATH:
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fleet-issuer", daemon=True)
        self._thread.start()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.url + JWKS_PATH,
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "subject_types_supported": ["public"],
            "response_types_supported": ["token"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.published]}

    def rotate(self) -> SigningKey:
        """Sign with a new key from now on, publishing it next to the old ones (a test of the key refresh)."""
        self.key = SigningKey.generate()
        self.published.append(self.key)
        return self.key

    def mint(self, subject: str, roles: Iterable[str], **options: Any) -> str:
        """A signed access token of this issuer (see `mint`)."""
        return mint(self.key, self.url, subject, roles, **options)

    def write_token(self, name: str, token: str) -> Path:
        """`token` in `<dir>/<name>.token`, mode 0600 (a service reads it through AUTH_TOKEN_FILE)."""
        path = self.directory / f"{name}.token"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        tmp.replace(path)
        return path

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalIssuer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
