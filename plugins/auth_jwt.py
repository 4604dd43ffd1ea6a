"""JWT authentication of WebSocket handshakes (``[plugins.auth_jwt]``; see docs/security.md).

Disabled by default: it then abstains and handshakes are anonymous, as without it. Enabled,
it reads a token from the ``Authorization: Bearer`` header, from a subprotocol
``bearer.<token>`` or (only with ``allow_query_token``) from the query parameter
``access_token``, verifies it with PyJWT and returns a :class:`bridge.Identity`:

* no token (and ``required``), a bad signature, an expired or not-yet-valid token, a wrong
  audience or issuer: :class:`bridge.AuthError` with status 401;
* a valid token whose ``chats`` claim does not grant the requested chat: status 403.

Keys: HS256/384/512 with ``secret`` (or ``secret_file`` / ``secret_env`` /
``secret_credential``), or RS*/PS*/ES* with ``public_key_file`` (PEM) or ``jwks_file`` (a
local JSON Web Key Set; the token's ``kid`` picks the key). Symmetric and asymmetric
algorithms cannot be mixed, so a public key can never be used as an HMAC secret.

:func:`mint_token` makes HS tokens (``bridged token``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import (
    AuthError,
    Command,
    Identity,
    PluginContext,
    Secret,
    hookimpl,
    not_negative,
    setting,
)

if TYPE_CHECKING:
    import jwt

# PyJWT and cryptography are imported where they are used: together they take about 0.12 s
# to import, which every daemon would pay at start-up, with [plugins.auth_jwt] or without.

HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}  # minimum key bytes: RFC 7518 section 3.2
RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC = frozenset({"ES256", "ES384", "ES512"})
ALGORITHMS = frozenset(HMAC) | RSA | EC

#: ``bridged check`` warns about an HS secret holding one of these words (split at every
#: character that is not a letter or a digit, case-insensitive).
DEV_WORDS = frozenset({"dev", "development", "test", "testing", "example", "demo", "insecure"})

SUBPROTOCOL_PREFIX = "bearer."
QUERY_PARAMETER = "access_token"


def _algorithms(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one algorithm"
    unknown = [a for a in value if a not in ALGORITHMS]
    if unknown:
        return f"unknown or refused algorithm {unknown[0]!r}; use {', '.join(sorted(ALGORITHMS))}"
    if set(value) & set(HMAC) and set(value) - set(HMAC):
        return "do not mix HS* with RS*/PS*/ES* algorithms (a public key must never be an HMAC key)"
    return None


def _claim_name(value: str) -> str | None:
    return None if value else "must not be empty"


@dataclass(frozen=True)
class AuthJwtSettings:
    enabled: bool = setting(False, doc="false: abstain, handshakes are anonymous")
    required: bool = setting(True, doc="refuse a handshake without a token (401); false: "
                                       "tokenless handshakes stay anonymous")
    algorithms: tuple[str, ...] = setting(("HS256",), check=_algorithms,
                                          doc="accepted token algorithms")
    secret: Secret | None = setting(None, doc="HS* key (at least 32/48/64 bytes); or "
                                              "secret_file, secret_env, secret_credential")
    public_key_file: Path | None = setting(None, doc="RS*/PS*/ES*: PEM public key")
    jwks_file: Path | None = setting(None, doc="RS*/PS*/ES*: local JSON Web Key Set")
    audience: str | None = setting(None, doc="required `aud`; unset: tokens with `aud` fail")
    issuer: str | None = setting(None, doc="required `iss`")
    leeway_s: float = setting(0.0, check=not_negative, doc="clock skew allowed on exp/nbf")
    require_exp: bool = setting(True, doc="refuse tokens without `exp`")
    subject_claim: str = setting("sub", check=_claim_name, doc="claim naming the sender")
    chats_claim: str = setting("chats", check=_claim_name,
                               doc="claim listing chat ids or fnmatch patterns")
    role_claim: str = setting("role", check=_claim_name, doc="claim holding the role")
    allow_query_token: bool = setting(False, doc="accept ?access_token= (tokens in URLs end "
                                                 "up in logs and proxies)")

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _load_key(self)  # raises ValueError: reported by the config loader with file:line
        word = dev_secret_word(self.secret) if self.secret is not None else None
        if word is not None:
            warnings.warn(f"plugins.auth_jwt.secret looks like a development secret (it holds"
                          f" the word {word!r}); use a random one: openssl rand -base64 48",
                          UserWarning, stacklevel=2)


def dev_secret_word(secret: str) -> str | None:
    """The development word (:data:`DEV_WORDS`) ``secret`` holds, or None."""
    for word in re.split(r"[^a-z0-9]+", secret.lower()):
        if word in DEV_WORDS:
            return word
    return None


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _Keys:
    """The verification key, or (JWKS) the keys by ``kid``."""

    key: Any = None
    by_kid: Mapping[str, jwt.PyJWK] | None = None


def _load_key(s: AuthJwtSettings) -> _Keys:
    """The keys ``s`` names, checked against its algorithms; ValueError says what is wrong."""
    hmac = set(s.algorithms) <= set(HMAC)
    if hmac:
        if s.public_key_file is not None or s.jwks_file is not None:
            raise ValueError("HS* algorithms take `secret`, not public_key_file or jwks_file")
        if s.secret is None:
            raise ValueError("`secret` (or secret_file, secret_env, secret_credential) is "
                             "required for HS* algorithms")
        need = max(HMAC[a] for a in s.algorithms)
        if len(s.secret.encode()) < need:
            raise ValueError(f"`secret` must be at least {need} bytes for "
                             f"{', '.join(s.algorithms)} (RFC 7518 section 3.2)")
        return _Keys(key=str(s.secret))
    if s.secret is not None:
        raise ValueError("RS*/PS*/ES* algorithms take public_key_file or jwks_file, not secret")
    if (s.public_key_file is None) == (s.jwks_file is None):
        raise ValueError("give exactly one of public_key_file or jwks_file for "
                         f"{', '.join(s.algorithms)}")
    if s.public_key_file is not None:
        return _Keys(key=_load_pem(s.public_key_file, s.algorithms))
    assert s.jwks_file is not None
    return _Keys(by_kid=_load_jwks(s.jwks_file, s.algorithms))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def _load_pem(path: Path, algorithms: Iterable[str]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read(path)
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{path} is not a PEM public key") from None
    wanted = set(algorithms)
    if isinstance(key, rsa.RSAPublicKey):
        if not wanted <= RSA:
            raise ValueError(f"{path} holds an RSA key; algorithms must be RS*/PS*")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not wanted <= EC:
            raise ValueError(f"{path} holds an EC key; algorithms must be ES*")
    else:
        raise ValueError(f"{path} holds a {type(key).__name__}; use an RSA or EC key")
    return key


def _load_jwks(path: Path, algorithms: Iterable[str]) -> dict[str, jwt.PyJWK]:
    import jwt

    text = _read(path)
    try:
        data = json.loads(text)
        keys = jwt.PyJWKSet.from_dict(data).keys
    except (ValueError, jwt.PyJWTError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a usable JSON Web Key Set: {e}") from None
    wanted = set(algorithms)
    usable = [k for k in keys if k.algorithm_name in wanted]
    if not usable:
        raise ValueError(f"{path} holds no key for {', '.join(sorted(wanted))}")
    by_kid: dict[str, jwt.PyJWK] = {}
    for k in usable:
        by_kid[k.key_id or ""] = k
    return by_kid


# --------------------------------------------------------------------------- verification


class Verifier:
    """Turns a handshake request into an :class:`Identity` or an :class:`AuthError`."""

    def __init__(self, settings: AuthJwtSettings) -> None:
        self.settings = settings
        self.keys = _load_key(settings)

    def authenticate(self, request: Mapping[str, Any]) -> Identity | None:
        token = self.token(request)
        if token is None:
            if self.settings.required:
                raise AuthError("a token is required: send 'Authorization: Bearer <token>' or "
                                f"the subprotocol '{SUBPROTOCOL_PREFIX}<token>'", status=401)
            return None
        identity = self.verify(token)
        chat_id = request.get("chat_id")
        if not isinstance(chat_id, str) or not identity.may_join(chat_id):
            raise AuthError(f"the token does not grant chat {chat_id!r}", status=403)
        return identity

    def token(self, request: Mapping[str, Any]) -> str | None:
        """The one token the request carries, or None."""
        found: set[str] = set()
        headers = request.get("headers") or {}
        authorization = headers.get("authorization")
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if isinstance(authorization, str):
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                found.add(value.strip())
        for protocol in request.get("subprotocols") or ():
            if isinstance(protocol, str) and protocol.startswith(SUBPROTOCOL_PREFIX):
                found.add(protocol[len(SUBPROTOCOL_PREFIX):])
        query = request.get("query") or {}
        if QUERY_PARAMETER in query:
            if not self.settings.allow_query_token:
                raise AuthError(f"tokens in the query ({QUERY_PARAMETER}) are disabled; send "
                                "'Authorization: Bearer <token>' or the subprotocol "
                                f"'{SUBPROTOCOL_PREFIX}<token>'", status=401)
            value = query[QUERY_PARAMETER]
            values = [value] if isinstance(value, str) else list(value)
            found.update(v for v in values if isinstance(v, str))
        if len(found) > 1:
            raise AuthError("more than one token in the request", status=401)
        return found.pop() if found else None

    def _key(self, token: str) -> Any:
        if self.keys.by_kid is None:
            return self.keys.key
        import jwt

        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None and len(self.keys.by_kid) == 1:
            return next(iter(self.keys.by_kid.values()))
        key = self.keys.by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(f"no key for the token's kid {str(kid)[:40]!r}", status=401)
        return key

    def verify(self, token: str) -> Identity:
        """The identity a valid ``token`` names; AuthError(401) for any invalid token."""
        import jwt

        s = self.settings
        required = [s.subject_claim, *(["exp"] if s.require_exp else [])]
        try:
            claims = jwt.decode(token, self._key(token), algorithms=list(s.algorithms),
                                audience=s.audience, issuer=s.issuer, leeway=s.leeway_s,
                                options={"require": required})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", status=401) from None
        except jwt.ImmatureSignatureError:  # nbf, or iat, in the future
            raise AuthError("token not valid yet (nbf or iat in the future)", status=401
                            ) from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted", status=401) from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted", status=401) from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature", status=401) from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"token lacks the {e.claim!r} claim", status=401) from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {str(e)[:100]}", status=401) from None
        return self._identity(claims)

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        s = self.settings
        subject = claims.get(s.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthError(f"the {s.subject_claim!r} claim must be a non-empty string")
        chats = claims.get(s.chats_claim, [])
        if isinstance(chats, str):
            chats = [chats]
        if not isinstance(chats, list) or not all(isinstance(c, str) for c in chats):
            raise AuthError(f"the {s.chats_claim!r} claim must be a list of strings")
        role = claims.get(s.role_claim)
        if role is not None and not isinstance(role, str):
            raise AuthError(f"the {s.role_claim!r} claim must be a string")
        exp = claims.get("exp")
        expires_at = float(exp) + s.leeway_s if isinstance(exp, int | float) else None
        return Identity(subject, tuple(chats), role, expires_at)


# --------------------------------------------------------------------------- minting


def mint_token(settings: AuthJwtSettings, *, subject: str, chats: Iterable[str], ttl_s: float,
               role: str | None = None, now: float | None = None) -> str:
    """An HS token these settings accept, valid ``ttl_s`` seconds from ``now``.
    ValueError when the settings verify with a public key or hold no usable secret."""
    hmac = [a for a in settings.algorithms if a in HMAC]
    if not hmac:
        raise ValueError(f"algorithms {', '.join(settings.algorithms)} verify with a public "
                         "key; mint tokens with the holder of the private key")
    if settings.secret is None:
        raise ValueError("`secret` (or secret_file, secret_env, secret_credential) is not set")
    if len(settings.secret.encode()) < HMAC[hmac[0]]:
        raise ValueError(f"`secret` is shorter than {HMAC[hmac[0]]} bytes")
    if ttl_s <= 0:
        raise ValueError("the time to live must be greater than 0")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        settings.subject_claim: subject,
        settings.chats_claim: list(chats),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
    }
    if role is not None:
        claims[settings.role_claim] = role
    import jwt

    if settings.audience is not None:
        claims["aud"] = settings.audience
    if settings.issuer is not None:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, str(settings.secret), algorithm=hmac[0])


# --------------------------------------------------------------------------- hooks


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sub", required=True, help="subject: the sender the token speaks as")
    parser.add_argument("--chat", action="append", default=[],
                        help="a chat id or fnmatch pattern it may join (repeat for more)")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    parser.add_argument("--role", help="the role claim")


def _token_command(args: argparse.Namespace, config: Any) -> int:
    """``bridged token``: print an HS token that this config's daemon accepts."""
    settings = config.plugins.settings.get("auth_jwt")
    if settings is None:
        print(f"{args.config}: the auth_jwt plugin is disabled", file=sys.stderr)
        return 1
    if not settings.enabled:
        print(f"{args.config}: WARNING: [plugins.auth_jwt] enabled = false: the daemon will "
              "not ask for this token", file=sys.stderr)
    try:
        token = mint_token(settings, subject=args.sub, chats=args.chat, ttl_s=args.ttl,
                           role=args.role)
    except ValueError as e:
        print(f"{args.config}: plugins.auth_jwt: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0


TOKEN_COMMAND = Command("token", "mint an HS token from the config's [plugins.auth_jwt]",
                        _token_arguments, _token_command)


class Plugin:
    def __init__(self) -> None:
        self.verifier: Verifier | None = None

    @hookimpl
    def bridge_register_commands(self, register: Callable[[Command], None]) -> None:
        register(TOKEN_COMMAND)

    @hookimpl
    def bridge_settings_class(self) -> type[AuthJwtSettings]:
        return AuthJwtSettings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        settings = context.settings
        if isinstance(settings, AuthJwtSettings) and settings.enabled:
            self.verifier = Verifier(settings)

    @hookimpl
    def bridge_authenticate_handshake(self, request: Mapping[str, Any]) -> Identity | None:
        if self.verifier is None:
            return None
        return self.verifier.authenticate(request)
