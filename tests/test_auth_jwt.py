"""The built-in JWT plugin, called through the real hook dispatch with a real config file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bridge import AuthError, ConfigError, Identity, PluginContext
from bridge.assembly import assemble
from bridge.plugins import Hooks
from bridge.testing import write_config

SECRET = "q7Vt2mXw9LpR4sNc8YhB3jKd6FgZ0aEu"  # 32 bytes, no development word
OTHER_SECRET = "Zr5Qm8Wc1Nx4Tb7Ky0Hs3Ld6Pf9Gj2Va"

BASE = """
[transports.chat]
type = "memory"

[plugins.auth_jwt]
"""

HS_CONFIG = BASE + f"""enabled = true
secret = "{SECRET}"
audience = "bridged"
"""

Authenticate = Callable[..., Awaitable[Any]]


def request(chat_id: str = "support-a", *, token: str | None = None, subprotocol: str | None = None,
            query_token: str | None = None) -> dict[str, Any]:
    """A handshake request as the WebSocket transport builds it."""
    headers = {"host": "127.0.0.1:3000"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    query: dict[str, str] = {}
    if query_token is not None:
        query["access_token"] = query_token
    return {"path": f"/v1/chats/{chat_id}", "chat_id": chat_id, "headers": headers,
            "query": query, "subprotocols": [subprotocol] if subprotocol else [],
            "remote": ("127.0.0.1", 50000)}


def hs_token(key: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "chats": ["support-a"], "aud": "bridged", "exp": now + 60}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm="HS256")


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Authenticate]]]:
    """``await auth(toml)`` -> ``authenticate(request)``: the config loaded from a file, the
    plugins started through ``Hooks.startup`` as the daemon does, handshakes dispatched
    through ``Hooks.authenticate``."""
    async with trio.open_nursery() as nursery:

        async def start(text: str) -> Authenticate:
            assembly = assemble(write_config(tmp_path, text))
            config = assembly.config
            config.daemon.state_dir.mkdir(parents=True, exist_ok=True)  # as Daemon.serve does
            pm = assembly.pm
            hooks = Hooks(pm)
            contexts = {name: PluginContext(name, config.plugins.settings.get(name),
                                            config.daemon.state_dir, nursery)
                        for name, _ in pm.list_name_plugin()}
            await hooks.startup(contexts)
            return hooks.authenticate

        yield start
        nursery.cancel_scope.cancel()


async def refused(authenticate: Authenticate, req: Mapping[str, Any]) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await authenticate(req)
    return caught.value


# --------------------------------------------------------------------------- HS256


async def test_no_token_is_401(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    error = await refused(authenticate, request())
    assert error.status == 401
    assert "token is required" in str(error)


async def test_token_for_chat_a_is_403_on_chat_b(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    token = hs_token(chats=["chat-a"], role="agent")
    identity = await authenticate(request("chat-a", token=token))
    assert isinstance(identity, Identity)
    assert (identity.subject, identity.chats, identity.role) == ("alice", ("chat-a",), "agent")
    error = await refused(authenticate, request("chat-b", token=token))
    assert error.status == 403
    assert "chat-b" in str(error)


async def test_wildcard_claim(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    token = hs_token(chats=["support-*"])
    identity = await authenticate(request("support-42", token=token))
    assert identity.subject == "alice"
    assert (await refused(authenticate, request("sales-1", token=token))).status == 403
    # patterns are case-sensitive: chat ids are
    assert (await refused(authenticate, request("SUPPORT-1", token=token))).status == 403


async def test_expires_at_is_the_tokens_exp(auth: Callable[[str], Awaitable[Authenticate]]
                                            ) -> None:
    authenticate = await auth(HS_CONFIG)
    exp = int(time.time()) + 120
    identity = await authenticate(request(token=hs_token(exp=exp)))
    assert identity.expires_at == float(exp)
    assert not identity.expired(exp - 1.0)
    assert identity.expired(float(exp))


async def test_expired_token_is_401(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    error = await refused(authenticate, request(token=hs_token(exp=int(time.time()) - 5)))
    assert (error.status, str(error)) == (401, "token expired")


async def test_leeway_extends_exp_and_expires_at(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG + "leeway_s = 30.0\n")
    exp = int(time.time()) - 5
    identity = await authenticate(request(token=hs_token(exp=exp)))
    assert identity.expires_at == exp + 30.0


async def test_nbf_in_the_future_is_401(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    error = await refused(authenticate, request(token=hs_token(nbf=int(time.time()) + 60)))
    assert error.status == 401
    assert "nbf" in str(error)


async def test_wrong_audience_is_401(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    error = await refused(authenticate, request(token=hs_token(aud="someone-else")))
    assert (error.status, str(error)) == (401, "token audience not accepted")
    error = await refused(authenticate, request(token=hs_token(aud=None)))
    assert (error.status, str(error)) == (401, "token lacks the 'aud' claim")


async def test_wrong_issuer_is_401(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG + 'issuer = "https://idp.example.org"\n')
    assert await authenticate(request(token=hs_token(iss="https://idp.example.org")))
    error = await refused(authenticate, request(token=hs_token(iss="https://evil.example")))
    assert (error.status, str(error)) == (401, "token issuer not accepted")


async def test_bad_signature_garbage_and_missing_claims_are_401(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    for token, reason in [
        (hs_token(key=OTHER_SECRET), "bad token signature"),
        ("not-a-jwt", "invalid token"),
        (jwt.encode({"sub": "alice", "chats": ["support-a"], "aud": "bridged"}, SECRET),
         "token lacks the 'exp' claim"),
        (hs_token(sub=None), "token lacks the 'sub' claim"),
        (hs_token(chats=[1, 2]), "'chats' claim must be a list of strings"),
    ]:
        error = await refused(authenticate, request(token=token))
        assert error.status == 401
        assert reason in str(error), (token, error)


async def test_alg_none_is_refused(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    unsigned = jwt.encode({"sub": "mallory", "chats": ["*"], "aud": "bridged",
                           "exp": int(time.time()) + 60}, "", algorithm="none")
    assert (await refused(authenticate, request(token=unsigned))).status == 401


async def test_subprotocol_token(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    identity = await authenticate(request(subprotocol=f"bearer.{hs_token()}"))
    assert identity.subject == "alice"


async def test_two_different_tokens_are_401(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    req = request(token=hs_token(sub="alice"), subprotocol=f"bearer.{hs_token(sub='bob')}")
    assert (await refused(authenticate, req)).status == 401
    same = hs_token()
    assert await authenticate(request(token=same, subprotocol=f"bearer.{same}"))


async def test_query_token_refused_unless_enabled(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG)
    error = await refused(authenticate, request(query_token=hs_token()))
    assert error.status == 401
    assert "disabled" in str(error)


async def test_query_token_when_enabled(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG + "allow_query_token = true\n")
    identity = await authenticate(request(query_token=hs_token()))
    assert identity.subject == "alice"


async def test_disabled_abstains(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(BASE)
    assert await authenticate(request()) is None
    assert await authenticate(request(token="anything")) is None


async def test_not_required_lets_tokenless_in_but_checks_tokens(
        auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG + "required = false\n")
    assert await authenticate(request()) is None
    assert (await refused(authenticate, request(token=hs_token(key=OTHER_SECRET)))).status == 401
    assert (await refused(authenticate, request("chat-b", token=hs_token()))).status == 403


async def test_custom_claim_names(auth: Callable[[str], Awaitable[Authenticate]]) -> None:
    authenticate = await auth(HS_CONFIG + 'subject_claim = "email"\nchats_claim = "rooms"\n'
                              'role_claim = "grp"\n')
    token = hs_token(sub=None, chats=None, email="a@example.org", rooms="support-a", grp="ops")
    identity = await authenticate(request(token=token))
    assert identity == Identity("a@example.org", ("support-a",), "ops", identity.expires_at)


# --------------------------------------------------------------------------- RS256, ES256


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def claims() -> dict[str, Any]:
    return {"sub": "alice", "chats": ["support-a"], "exp": int(time.time()) + 60}


async def test_rs256_with_a_public_key_file(
        auth: Callable[[str], Awaitable[Authenticate]], tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "public.pem").write_bytes(pem_public(private))
    authenticate = await auth(BASE + 'enabled = true\nalgorithms = ["RS256"]\n'
                                     'public_key_file = "public.pem"\n')
    identity = await authenticate(request(token=jwt.encode(claims(), private, algorithm="RS256")))
    assert identity.subject == "alice"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    error = await refused(authenticate,
                          request(token=jwt.encode(claims(), stranger, algorithm="RS256")))
    assert (error.status, str(error)) == (401, "bad token signature")
    # algorithm confusion: a token "signed" with HS256 using the public key as the secret
    assert (await refused(authenticate, request(token=hs256_with_key(
        pem_public(private))))).status == 401


def hs256_with_key(key: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(claims()).encode()))
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_es256_via_a_jwks_file(
        auth: Callable[[str], Awaitable[Authenticate]], tmp_path: Path) -> None:
    signer, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, key in (("k1", signer), ("k2", other)):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    authenticate = await auth(BASE + 'enabled = true\nalgorithms = ["ES256"]\n'
                                     'jwks_file = "jwks.json"\n')
    token = jwt.encode(claims(), signer, algorithm="ES256", headers={"kid": "k1"})
    assert (await authenticate(request(token=token))).subject == "alice"
    wrong_kid = jwt.encode(claims(), signer, algorithm="ES256", headers={"kid": "k2"})
    assert str(await refused(authenticate, request(token=wrong_kid))) == "bad token signature"
    unknown = jwt.encode(claims(), signer, algorithm="ES256", headers={"kid": "k9"})
    assert "no key for the token's kid 'k9'" in str(await refused(authenticate,
                                                                  request(token=unknown)))
    no_kid = jwt.encode(claims(), signer, algorithm="ES256")  # two keys: kid is needed
    assert (await refused(authenticate, request(token=no_kid))).status == 401


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("table", "problem"), [
    (f'enabled = true\nsecret = "{SECRET[:20]}"\n', "`secret` must be at least 32 bytes"),
    ('enabled = true\n', "`secret` (or secret_file, secret_env, secret_credential) is required"),
    (f'enabled = true\nalgorithms = ["HS256", "RS256"]\nsecret = "{SECRET}"\n',
     "algorithms: do not mix HS*"),
    ('enabled = true\nalgorithms = ["none"]\n', "unknown or refused algorithm 'none'"),
    ('enabled = true\nalgorithms = ["RS256"]\n', "give exactly one of public_key_file or"),
    ('enabled = true\nalgorithms = ["RS256"]\npublic_key_file = "nope.pem"\n', "cannot read"),
    ('enabled = true\nsecret = "changeme"\n', "is a placeholder"),
])
def test_config_errors_name_file_line_and_key(tmp_path: Path, table: str, problem: str) -> None:
    path = write_config(tmp_path, BASE + table)
    with pytest.raises(ConfigError) as caught:
        assemble(path)
    (line,) = caught.value.errors
    assert re.match(rf"{re.escape(str(path))}:\d+: plugins\.auth_jwt", line), line
    assert problem in line, line


def test_ec_key_file_with_rs256_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ec.pem").write_bytes(pem_public(ec.generate_private_key(ec.SECP256R1())))
    path = write_config(tmp_path, BASE + 'enabled = true\nalgorithms = ["RS256"]\n'
                                         'public_key_file = "ec.pem"\n')
    with pytest.raises(ConfigError, match="holds an EC key; algorithms must be ES"):
        assemble(path)


def test_secret_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGED_JWT_SECRET", SECRET)
    config = assemble(write_config(tmp_path, BASE + 'enabled = true\n'
                                                    'secret_env = "BRIDGED_JWT_SECRET"\n')).config
    settings = config.plugins.settings["auth_jwt"]
    assert settings.secret == SECRET
    assert SECRET not in repr(settings)


# --------------------------------------------------------------------------- command line


def bridged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True,
                          timeout=60)


async def test_bridged_token_output_verifies(
        auth: Callable[[str], Awaitable[Authenticate]], tmp_path: Path) -> None:
    path = write_config(tmp_path, HS_CONFIG, name="cli.toml")
    result = bridged("token", "-c", str(path), "--sub", "bob", "--chat", "support-*",
                     "--ttl", "3600", "--role", "agent")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    authenticate = await auth(HS_CONFIG)
    identity = await authenticate(request("support-7", token=token))
    assert (identity.subject, identity.chats, identity.role) == ("bob", ("support-*",), "agent")
    assert identity.expires_at is not None
    assert 3590 < identity.expires_at - time.time() <= 3600


def test_bridged_token_refuses_public_key_configs(tmp_path: Path) -> None:
    (tmp_path / "public.pem").write_bytes(pem_public(ec.generate_private_key(ec.SECP256R1())))
    path = write_config(tmp_path, BASE + 'enabled = true\nalgorithms = ["ES256"]\n'
                                         'public_key_file = "public.pem"\n')
    result = bridged("token", "-c", str(path), "--sub", "bob")
    assert result.returncode == 1
    assert "verify with a public key" in result.stderr
    assert result.stdout == ""


def test_check_warns_about_a_development_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE + 'enabled = true\n'
                        'secret = "dev-secret-do-not-use-in-production-0123456789"\n')
    result = bridged("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: WARNING: plugins.auth_jwt.secret looks like a development secret" \
        in result.stderr
    quiet = bridged("check", "-c", str(write_config(tmp_path, HS_CONFIG, name="prod.toml")))
    assert quiet.returncode == 0
    assert "WARNING" not in quiet.stderr
