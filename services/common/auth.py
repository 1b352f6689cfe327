"""Who is calling: OIDC bearer tokens checked against the issuer's published keys, and the roles they carry.

People and callers present `Authorization: Bearer <JWT>` (an HTTP header, or the gRPC metadata `authorization`).
A token is accepted when its signature verifies with a key of the issuer's JWKS (found by OIDC discovery from
AUTH_ISSUER, or read from AUTH_JWKS_FILE by a service that may not call out, the sandbox), it is within its validity (`exp`, `nbf`, give or take AUTH_LEEWAY_SECONDS),
its `iss` is AUTH_ISSUER and its `aud` holds AUTH_AUDIENCE. Only asymmetric algorithms are accepted: no `none`,
no HMAC (a public key is never a shared secret). Keys are cached; a token naming an unknown `kid` fetches them
again, at most once per `refresh_interval` (garbage key ids cannot make a service hammer its issuer).

Roles come from the claim AUTH_ROLES_CLAIM, a dotted path (`roles`, `groups`, Keycloak's `realm_access.roles`).
`admin` holds every role; `deliberator`, `product-owner` and `service` can also read (`viewer`).

With AUTH_ISSUER empty, authentication is off: every caller is `anonymous` with every role. That is for a
developer's loopback only; each service says so in its start-up log, and the manifests set AUTH_ISSUER.

Every refused call and every call of an audited (state-changing) method is one JSON line on the `fleet.audit`
logger: actor, method, outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt

from services.common.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("fleet.auth")
audit_log = logging.getLogger("fleet.audit")

VIEWER, DELIBERATOR, PRODUCT_OWNER, ADMIN, SERVICE = "viewer", "deliberator", "product-owner", "admin", "service"
ROLES = (VIEWER, DELIBERATOR, PRODUCT_OWNER, ADMIN, SERVICE)
IMPLIED: Mapping[str, frozenset[str]] = {
    ADMIN: frozenset(ROLES),
    DELIBERATOR: frozenset({VIEWER}),
    PRODUCT_OWNER: frozenset({VIEWER}),
    SERVICE: frozenset({VIEWER}),
}
# Asymmetric signatures only: `none` and the HMAC family are refused before any key is looked at.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's subject, its email when it has one, and the roles it was given."""

    subject: str
    roles: frozenset[str] = frozenset()
    email: str = ""
    granted: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        granted = set(self.roles)
        for role in self.roles:
            granted |= IMPLIED.get(role, frozenset())
        object.__setattr__(self, "granted", frozenset(granted))

    @property
    def actor(self) -> str:
        """The name decisions and audit lines record: the email when the token has one, else the subject."""
        return self.email or self.subject

    def require(self, role: str, action: str) -> None:
        if role not in self.granted:
            held = ", ".join(sorted(self.roles)) or "none"
            raise PermissionDenied(f"{self.actor} lacks role {role} for {action} (holds: {held})")


ANONYMOUS = Principal("anonymous", frozenset({ADMIN}))

# The caller of the request being served (set by the gRPC interceptor and the HTTP dependency).
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value; Unauthenticated when there is none."""
    if not authorization:
        raise Unauthenticated("no bearer token: send 'Authorization: Bearer <token>' (fleet token mints one locally)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header is not 'Bearer <token>'")
    return token.strip()


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of the claims (`realm_access.roles`), None when absent."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def roles_of(value: Any) -> frozenset[str]:
    """A roles claim as a set: a list of strings, or one space-separated string (as `scope` is)."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class IssuerUnavailable(Unavailable):
    """The issuer's keys cannot be had: no caller's fault (UNAVAILABLE / 503 naming the issuer)."""

    dependency = "issuer"


class Authenticator:
    """Checks bearer tokens of one issuer (see the module docstring)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        roles_claim: str = "roles",
        leeway_seconds: float = 30.0,
        refresh_interval: float = 1.0,
        http_timeout: float = 5.0,
        jwks_file: str = "",
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.roles_claim = roles_claim
        self.jwks_url = ""  # from the discovery document
        self.jwks_file = jwks_file
        self.leeway = leeway_seconds
        self.refresh_interval = refresh_interval
        self.http_timeout = http_timeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._fetch_error = ""
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator | None:
        """The authenticator the settings ask for; None when AUTH_ISSUER is empty (authentication off)."""
        if not settings.auth_issuer:
            return None
        return cls(
            settings.auth_issuer,
            settings.auth_audience,
            roles_claim=settings.auth_roles_claim,
            leeway_seconds=settings.auth_leeway_seconds,
            jwks_file=settings.auth_jwks_file,
        )

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"malformed token: {e}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"token algorithm {alg!r} is refused (accepted: {', '.join(ALGORITHMS)})")
        key = await self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"token issuer is not {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"token audience does not include {self.audience}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature does not verify") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        email = claims.get("email")
        return Principal(
            str(claims["sub"]),
            roles_of(claim(claims, self.roles_claim)),
            email=email if isinstance(email, str) else "",
        )

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is not None:
            return key
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            key = self._lookup(kid)
            if key is None and time.monotonic() - self._fetched_at >= self.refresh_interval:
                await self._refresh()
                key = self._lookup(kid)
        if key is None:
            if not self._keys and self._fetch_error:
                raise IssuerUnavailable(f"cannot check tokens: {self._fetch_error}")
            raise Unauthenticated(f"token signed with an unknown key (kid {kid!r}) of {self.issuer}")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:  # a token without `kid` from an issuer with one key
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            if self.jwks_file:
                keys = jwt.PyJWKSet.from_json(await asyncio.to_thread(Path(self.jwks_file).read_text)).keys
            else:
                async with httpx.AsyncClient(timeout=self.http_timeout) as http:
                    url = self.jwks_url or await self._discover(http)
                    reply = await http.get(url)
                    reply.raise_for_status()
                    keys = jwt.PyJWKSet.from_dict(reply.json()).keys
        except (httpx.HTTPError, OSError, ValueError, jwt.PyJWTError) as e:
            where = self.jwks_file or self.jwks_url or self.issuer
            self._fetch_error = f"the keys of {self.issuer} could not be read from {where}: {type(e).__name__}: {e}"
            log.warning("%s", self._fetch_error)
            return
        self._keys = {k.key_id: k for k in keys}
        self._fetch_error = ""
        log.info("keys of %s: %s", self.issuer, ", ".join(str(k) for k in self._keys) or "none")

    async def _discover(self, http: httpx.AsyncClient) -> str:
        reply = await http.get(f"{self.issuer}/.well-known/openid-configuration")
        reply.raise_for_status()
        document = reply.json()
        if document.get("issuer", "").rstrip("/") != self.issuer:
            raise ValueError(f"the discovery document names issuer {document.get('issuer')!r}")
        self.jwks_url = str(document["jwks_uri"])
        return self.jwks_url


class Guard:
    """The roles each method needs, checked for each call (both transports use it).

    `roles` maps a method (the gRPC full name `/pkg.Service/Method`, or an HTTP route name) to the role it needs;
    `audited` are the methods whose every call is audited (those that change something or spend the GPU).
    """

    def __init__(
        self, authenticator: Authenticator | None, roles: Mapping[str, str], audited: frozenset[str] = frozenset()
    ) -> None:
        self.authenticator = authenticator
        self.roles = dict(roles)
        self.audited = audited
        unknown = {r for r in self.roles.values() if r not in ROLES}
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)} (known: {', '.join(ROLES)})")

    @property
    def enabled(self) -> bool:
        return self.authenticator is not None

    async def admit(self, method: str, authorization: str | None, role: str | None = "") -> Principal:
        """The caller, allowed to call `method` (with `role`, else the role the table gives it; None: any caller);
        Unauthenticated / PermissionDenied, audited, otherwise."""
        try:
            principal = ANONYMOUS
            if self.authenticator is not None:
                principal = await self.authenticator.authenticate(authorization)
            needed = self.roles[method] if role == "" else role
            if needed is not None:
                principal.require(needed, method)
        except (Unauthenticated, PermissionDenied) as e:
            audit(principal.actor if isinstance(e, PermissionDenied) else "", method, e.code, e.message)
            raise
        current_principal.set(principal)
        return principal

    def done(self, method: str, principal: Principal, outcome: str, detail: str = "") -> None:
        """Audit the end of an admitted call when the method is audited."""
        if method in self.audited:
            audit(principal.actor, method, outcome, detail)


def audit(actor: str, method: str, outcome: str, detail: str = "") -> None:
    """One audit line (JSON with the service's JSON logging): who did what, and how it ended."""
    audit_log.info(
        "%s %s by %s%s",
        method,
        outcome,
        actor or "(unauthenticated)",
        f": {detail}" if detail else "",
        extra={"audit": True, "actor": actor, "method": method, "outcome": outcome, "detail": detail},
    )


def announce(guard: Guard, service: str) -> None:
    """The start-up line saying how callers are authenticated (loudly when they are not)."""
    if guard.authenticator is None:
        log.warning("%s: authentication is OFF (AUTH_ISSUER unset): every caller is trusted with every role", service)
    else:
        a = guard.authenticator
        log.info("%s: bearer tokens of %s (audience %s, roles from %r)", service, a.issuer, a.audience, a.roles_claim)


class BearerToken:
    """The token a caller sends: a fixed value, or a file read again whenever it changes (a projected Kubernetes
    token is rotated in place; AUTH_TOKEN_FILE). Neither: no token is sent."""

    def __init__(self, path: str | Path | None = None, value: str = "") -> None:
        self.path = Path(path) if path else None
        self._token = value.strip()
        self._mtime = -1.0

    def __bool__(self) -> bool:
        return bool(self.path or self._token)

    def header(self) -> str | None:
        """`Bearer <token>`, or None without a token."""
        if self.path is not None:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                raise Unauthenticated(f"the token file {self.path} is missing") from None
            if mtime != self._mtime:
                self._token = self.path.read_text().strip()
                self._mtime = mtime
        return f"Bearer {self._token}" if self._token else None


class _Bearer:
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        header = self.token.header()
        if header is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata["authorization"] = header
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# Two classes: a grpc.aio channel files each interceptor under the first kind it is an instance of, so one object
# that is both would never see the streaming calls (they went out without a token).
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def channel(address: str, token: BearerToken | None = None, **options: Any) -> grpc.aio.Channel:
    """An insecure-transport channel (TLS ends at the mesh or Ingress) whose every call carries `token`."""
    interceptors: list[Any] | None = [_BearerUnary(token), _BearerStream(token)] if token else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors, **options)


def service_guard(settings: Any, service: str, roles: Mapping[str, str], audited: Iterable[str] = ()) -> Guard:
    """The guard of one gRPC service: `roles` by method name (Deliberate -> deliberator), `audited` method names."""
    guard = Guard(
        Authenticator.from_settings(settings),
        {f"/{service}/{method}": role for method, role in roles.items()},
        frozenset(f"/{service}/{method}" for method in audited),
    )
    announce(guard, service)
    return guard
