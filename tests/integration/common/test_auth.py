"""Bearer tokens checked against a real issuer on loopback (OIDC discovery + JWKS over HTTP), and the gRPC guard.

Every bad token of issue 13's list is refused with UNAUTHENTICATED and a message saying why; a token without the
method's role is PERMISSION_DENIED; nothing reaches the handler in either case; refusals and audited calls are
audit lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.context.v1 import context_pb2, context_pb2_grpc
from services.common import auth
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.grpc_server import GrpcServer
from services.local.issuer import LocalIssuer, SigningKey, mint

pytestmark = pytest.mark.integration

SERVICE = "fleet.context.v1.ContextService"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, claims: dict, sign) -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(sign(head.encode()))


def claims_of(issuer: LocalIssuer, **over) -> dict:
    now = int(time.time())
    return {"iss": issuer.url, "sub": "mallory", "aud": "swe-ai-fleet", "exp": now + 600, "roles": ["admin"], **over}


@pytest.fixture
def authenticator(issuer) -> auth.Authenticator:
    return auth.Authenticator(issuer.url, "swe-ai-fleet", leeway_seconds=5, refresh_interval=0)


async def test_a_valid_token_names_its_caller_and_roles(issuer, authenticator):
    token = issuer.mint("u-1", ["viewer", "product-owner"], email="alice@example.com")
    who = await authenticator.authenticate(f"Bearer {token}")
    assert (who.subject, who.email, who.actor) == ("u-1", "alice@example.com", "alice@example.com")
    assert who.roles == {"viewer", "product-owner"}
    who.require("product-owner", "approve")
    with pytest.raises(PermissionDenied, match=re.escape("alice@example.com lacks role admin for x")):
        who.require("admin", "x")


async def test_roles_from_a_nested_claim_as_keycloak_puts_them(issuer):
    keycloak = auth.Authenticator(issuer.url, "swe-ai-fleet", roles_claim="realm_access.roles")
    token = issuer.mint("u-2", [], realm_access={"roles": ["deliberator"]})
    assert (await keycloak.authenticate(f"Bearer {token}")).granted == {"deliberator", "viewer"}


def bad_tokens(issuer: LocalIssuer) -> dict[str, tuple[str | None, str]]:
    other = SigningKey.generate()
    public_pem = issuer.key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    return {
        "no token": (None, "no bearer token"),
        "not bearer": ("Basic dXNlcjpwYXNz", "is not 'Bearer <token>'"),
        "malformed": ("Bearer not.a.jwt", "malformed token"),
        "bad signature": (
            "Bearer "
            + forged({"alg": "RS256", "kid": issuer.key.kid, "typ": "JWT"}, claims_of(issuer), lambda m: b"x" * 256),
            "signature does not verify",
        ),
        "signed by another key with our kid": (
            "Bearer "
            + mint(other, issuer.url, "mallory", ["admin"]).replace(
                json_header(other.kid), json_header(issuer.key.kid)
            ),
            "signature does not verify",
        ),
        "expired": ("Bearer " + issuer.mint("u", ["admin"], ttl_seconds=-60), "token expired"),
        "not yet valid": ("Bearer " + issuer.mint("u", ["admin"], nbf=now + 3600), "not yet valid"),
        "wrong issuer": ("Bearer " + mint(issuer.key, "https://evil.example", "u", ["admin"]), "issuer is not"),
        "wrong audience": ("Bearer " + issuer.mint("u", ["admin"], audience="another-api"), "audience"),
        "unknown kid": ("Bearer " + mint(other, issuer.url, "u", ["admin"]), "unknown key"),
        "alg none": (
            "Bearer " + forged({"alg": "none", "typ": "JWT"}, claims_of(issuer), lambda m: b""),
            "algorithm 'none' is refused",
        ),
        "HS256 signed with the public key": (
            "Bearer "
            + forged(
                {"alg": "HS256", "kid": issuer.key.kid, "typ": "JWT"},
                claims_of(issuer),
                lambda m: hmac.new(public_pem, m, hashlib.sha256).digest(),
            ),
            "algorithm 'HS256' is refused",
        ),
        "no subject": ("Bearer " + forged_without_sub(issuer), "sub"),
    }


def json_header(kid: str) -> str:
    """The encoded header `jwt.encode` writes for an RS256 token with `kid` (to swap one key id for another)."""
    return b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())


def forged_without_sub(issuer: LocalIssuer) -> str:
    import jwt

    claims = claims_of(issuer)
    del claims["sub"]
    return jwt.encode(claims, issuer.key.private, algorithm="RS256", headers={"kid": issuer.key.kid})


async def test_every_bad_token_is_refused_saying_why(issuer, authenticator):
    for case, (authorization, why) in bad_tokens(issuer).items():
        with pytest.raises(Unauthenticated) as refused:
            await authenticator.authenticate(authorization)
        assert why in refused.value.message, f"{case}: {refused.value.message}"


async def test_a_rotated_key_is_fetched_when_a_token_names_it(tmp_path):
    with LocalIssuer(tmp_path) as issuer:
        checker = auth.Authenticator(issuer.url, "swe-ai-fleet", refresh_interval=0)
        assert (await checker.authenticate("Bearer " + issuer.mint("u", ["viewer"]))).subject == "u"
        old = issuer.key.kid
        issuer.rotate()
        assert issuer.key.kid != old
        assert (await checker.authenticate("Bearer " + issuer.mint("v", ["viewer"]))).subject == "v"
        limited = auth.Authenticator(issuer.url, "swe-ai-fleet", refresh_interval=3600)
        await limited.authenticate("Bearer " + issuer.mint("w", ["viewer"]))
        issuer.rotate()  # within the refresh interval an unknown kid is refused, not fetched again
        with pytest.raises(Unauthenticated, match="unknown key"):
            await limited.authenticate("Bearer " + issuer.mint("x", ["viewer"]))


async def test_keys_from_a_file_for_a_service_that_may_not_call_out(issuer, tmp_path):
    """The sandbox has no egress: it reads the issuer's JWKS from a mounted file; none there is UNAVAILABLE, not a
    caller's fault."""
    from services.common.errors import Unavailable

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    offline = auth.Authenticator(issuer.url, "swe-ai-fleet", jwks_file=str(jwks), refresh_interval=0)
    token = "Bearer " + issuer.mint("orchestrator", ["service"])
    with pytest.raises(Unavailable, match="could not be read from") as down:
        await offline.authenticate(token)
    assert down.value.dependency == "issuer"  # what the HTTP API names in its 503
    jwks.write_text(json.dumps(issuer.jwks()))
    assert (await offline.authenticate(token)).subject == "orchestrator"


def test_a_token_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "svc.token"
    path.write_text("one\n")
    token = auth.BearerToken(path)
    assert token.header() == "Bearer one"
    path.write_text("two\n")
    import os

    os.utime(path, (time.time() + 5, time.time() + 5))
    assert token.header() == "Bearer two"
    path.unlink()
    with pytest.raises(Unauthenticated, match="is missing"):
        token.header()
    assert auth.BearerToken().header() is None


# --- the gRPC guard ------------------------------------------------------------------------------------------------


class Servicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def GetContext(self, request, context):
        self.calls.append(("GetContext", auth.current_principal.get().actor))
        return context_pb2.GetContextResponse(context="ok", version="v1")

    async def UpdateContext(self, request, context):
        self.calls.append(("UpdateContext", auth.current_principal.get().actor))
        return context_pb2.UpdateContextResponse(version="v2")

    async def RehydrateSession(self, request, context):  # pragma: no cover - not called
        raise NotImplementedError

    async def ValidateScope(self, request, context):  # pragma: no cover - not called
        raise NotImplementedError


@pytest.fixture
async def guarded(issuer):
    servicer = Servicer()
    roles = {
        "GetContext": "viewer",
        "UpdateContext": "service",
        "RehydrateSession": "viewer",
        "ValidateScope": "viewer",
    }

    class Settings:
        auth_issuer, auth_audience, auth_roles_claim, auth_leeway_seconds = issuer.url, "swe-ai-fleet", "roles", 5.0
        auth_jwks_file = ""

    guard = auth.service_guard(Settings, SERVICE, roles, audited=["UpdateContext"])
    server = GrpcServer(
        [(context_pb2_grpc.add_ContextServiceServicer_to_server, servicer, SERVICE)], 0, "127.0.0.1", guard=guard
    )
    await server.start()
    yield f"127.0.0.1:{server.port}", servicer
    await server.stop(0.5)


def reason(e: grpc.aio.AioRpcError) -> str:
    raw = dict(e.trailing_metadata())["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info.reason


async def call(address: str, method: str, token: str | None):
    async with auth.channel(address, auth.BearerToken(value=token or "")) as ch:
        stub = context_pb2_grpc.ContextServiceStub(ch)
        if method == "GetContext":
            return await stub.GetContext(context_pb2.GetContextRequest(story_id="S-1", role="DEV"), timeout=5)
        return await stub.UpdateContext(context_pb2.UpdateContextRequest(story_id="S-1"), timeout=5)


async def test_grpc_methods_need_a_valid_token_with_their_role(guarded, issuer, caplog):
    address, servicer = guarded
    caplog.set_level(logging.INFO, logger="fleet.audit")
    async with grpc.aio.insecure_channel(address) as ch:  # probes need no token
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    for token, expected, why in [
        (None, grpc.StatusCode.UNAUTHENTICATED, "no bearer token"),
        (issuer.mint("u", ["viewer"], ttl_seconds=-60), grpc.StatusCode.UNAUTHENTICATED, "token expired"),
        (issuer.mint("u", ["viewer"], audience="x"), grpc.StatusCode.UNAUTHENTICATED, "audience"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(address, "GetContext", token)
        assert refused.value.code() == expected and why in refused.value.details()
        assert reason(refused.value) == "Unauthenticated"

    viewer = issuer.mint("viewer-1", ["viewer"], email="vera@example.com")
    assert (await call(address, "GetContext", viewer)).context == "ok"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(address, "UpdateContext", viewer)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        f"vera@example.com lacks role service for /{SERVICE}/UpdateContext (holds: viewer)"
    )
    assert (await call(address, "UpdateContext", issuer.mint("orchestrator", ["service"]))).version == "v2"
    assert servicer.calls == [("GetContext", "vera@example.com"), ("UpdateContext", "orchestrator")]

    lines = [(r.actor, r.method, r.outcome) for r in caplog.records if r.name == "fleet.audit"]
    update = f"/{SERVICE}/UpdateContext"
    assert ("vera@example.com", update, "PERMISSION_DENIED") in lines
    assert ("orchestrator", update, "OK") in lines
    assert ("", f"/{SERVICE}/GetContext", "UNAUTHENTICATED") in lines
    assert ("vera@example.com", f"/{SERVICE}/GetContext", "OK") not in lines  # reads are not audited


def test_a_method_without_a_role_is_refused_at_start():
    guard = auth.Guard(None, {f"/{SERVICE}/GetContext": "viewer"})
    with pytest.raises(ValueError, match=re.escape(f"no role says who may call /{SERVICE}/UpdateContext")):
        GrpcServer([(context_pb2_grpc.add_ContextServiceServicer_to_server, Servicer(), SERVICE)], 0, guard=guard)
