"""Users file, password hashes, certificates and the folder trust list (no network)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from plant_models.errors import ConfigError
from sim.opcua.apc import Role
from sim.opcua.security import (
    FolderTrustList,
    LoginGuard,
    LoginPolicy,
    RoleUserManager,
    certificate_uris,
    ensure_certificate,
    hash_password,
    load_users,
    verify_password,
    write_user,
)


def test_password_hash_roundtrip_and_salt() -> None:
    a = hash_password("secret", iterations=1000)
    b = hash_password("secret", iterations=1000)
    assert a != b  # salted
    assert verify_password("secret", a)
    assert not verify_password("Secret", a)
    assert not verify_password("secret", "garbage")


def test_users_file_roles_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    write_user(path, "apc", Role.APC, "pw1", iterations=1000)
    write_user(path, "viewer", Role.VIEWER, "pw2", iterations=1000)
    users = load_users(path)
    assert {u.role for u in users.values()} == {Role.APC, Role.VIEWER}
    assert "pw1" not in path.read_text()
    manager = RoleUserManager(users)
    user = manager.get_user(None, "apc", "pw1")
    assert user is not None
    identity = manager.identity(user)
    assert identity is not None and identity.role is Role.APC
    assert manager.get_user(None, "apc", "wrong") is None
    assert manager.get_user(None, "nobody", "pw1") is None
    assert manager.get_user(None, None, None) is None  # anonymous


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[users.a]\nrole = "admin"\npassword = "x"\n', "allowed: viewer"),
        ('[users.a]\nrole = "apc"\npassword = "plain"\n', "pbkdf2_sha256"),
        ('[users.a]\nrole = "apc"\npasword = "x"\n', "unknown key"),
        ("[user]\n", "unknown key"),
    ],
)
def test_bad_users_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_users(path)


def test_missing_users_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opcua-user"):
        load_users(tmp_path / "none.toml")


def test_certificate_generated_once_with_uri_san(tmp_path: Path) -> None:
    cert, _ = asyncio.run(ensure_certificate(tmp_path, "srv", "urn:x:server"))
    assert certificate_uris(cert.read_bytes()) == ["urn:x:server"]
    first = cert.read_bytes()
    asyncio.run(ensure_certificate(tmp_path, "srv", "urn:x:server"))
    assert cert.read_bytes() == first  # reused on the next run
    asyncio.run(ensure_certificate(tmp_path, "srv", "urn:x:other"))
    assert certificate_uris(cert.read_bytes()) == ["urn:x:other"]  # SAN follows the URI


def test_folder_trust_list_empty_trusted_and_uri(tmp_path: Path) -> None:
    key, der = tmp_path / "k.pem", tmp_path / "c.der"
    asyncio.run(
        setup_self_signed_certificate(
            key,
            der,
            "urn:client",
            "localhost",
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            {"commonName": "c"},
        )
    )
    cert = x509.load_der_x509_certificate(der.read_bytes())
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    check = FolderTrustList(trusted, tmp_path / "rejected")
    app = ua.ApplicationDescription(ApplicationUri="urn:client")
    with pytest.raises(ServiceError):  # empty trust list: valid, trusts nobody
        asyncio.run(check(cert, app))
    assert len(list((tmp_path / "rejected").iterdir())) == 1
    (trusted / "client.der").write_bytes(der.read_bytes())
    asyncio.run(check(cert, app))  # trusted now, without a restart
    with pytest.raises(ServiceError):
        asyncio.run(check(cert, ua.ApplicationDescription(ApplicationUri="urn:someone-else")))


# -- login guard (no network: the real hashing in worker threads, a hand-driven clock) --------
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _guard(tmp_path: Path, **policy: float) -> tuple[LoginGuard, _Clock]:
    path = tmp_path / "users.toml"
    write_user(path, "apc", Role.APC, "right", iterations=1000)
    clock = _Clock()
    settings = {"max_failures": 3, "lockout_s": 60.0, "backoff_s": 0.0, **policy}
    guard = LoginGuard(
        RoleUserManager(load_users(path)),
        LoginPolicy(**settings),  # type: ignore[arg-type]
        clock=clock,
    )
    return guard, clock


def test_lockout_refuses_the_right_password_then_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard, clock = _guard(tmp_path)

    async def go() -> list[bool]:
        try:
            out = []
            for password in ("w1", "w2", "w3", "right"):
                user = await guard.login("apc", password, address="10.0.0.9", thumbprint="ab")
                out.append(user is not None)
            # another address is not locked out by this one's failures
            other = await guard.login("apc", "right", address="10.0.0.7", thumbprint="cd")
            out.append(other is not None)
            # nor another certificate on the same address (a second client on the host)
            same_host = await guard.login("apc", "right", address="10.0.0.9", thumbprint="ef")
            out.append(same_host is not None)
            clock.t += 61.0  # the lock-out period has passed
            again = await guard.login("apc", "right", address="10.0.0.9", thumbprint="ab")
            out.append(again is not None)
            return out
        finally:
            guard.close()

    with caplog.at_level(logging.WARNING, logger="sim.opcua.security"):
        assert asyncio.run(go()) == [False, False, False, False, True, True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert any("locked out for 60 s" in m and "10.0.0.9" in m for m in messages)
    assert any("client locked out" in m and "10.0.0.9" in m for m in messages)
    assert any("lock-out of 10.0.0.9 with certificate ab ended" in m for m in messages)


def test_failures_expire_and_backoff_doubles(tmp_path: Path) -> None:
    guard, clock = _guard(tmp_path, max_failures=3, failure_window_s=100.0, backoff_s=0.01)

    async def go() -> bool:
        try:
            for _ in range(2):
                await guard.login("apc", "wrong", address="a", thumbprint="t")
            clock.t += 101.0  # both failures out of the window: no lock-out at the third
            await guard.login("apc", "wrong", address="a", thumbprint="t")
            return await guard.login("apc", "right", address="a", thumbprint="t") is not None
        finally:
            guard.close()

    assert asyncio.run(go())


def test_pending_login_cap_refuses_at_once(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    write_user(path, "apc", Role.APC, "right", iterations=400_000)  # slow on purpose
    guard = LoginGuard(
        RoleUserManager(load_users(path)),
        LoginPolicy(max_failures=0, backoff_s=0.0, hash_workers=1, max_pending_logins=2),
    )

    async def go() -> list[object]:
        try:
            calls = [guard.login("apc", "wrong", address=f"h{i}", thumbprint="t") for i in range(5)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            guard.close()

    results = asyncio.run(go())
    busy = [r for r in results if isinstance(r, ServiceError)]
    assert len(busy) == 3 and all(r.code == ua.StatusCodes.BadTooManyOperations for r in busy)
    assert results[:2] == [None, None]


def test_login_policy_validates() -> None:
    with pytest.raises(ConfigError, match="hash_workers"):
        LoginPolicy(hash_workers=0)
    with pytest.raises(ConfigError, match="lockout_s"):
        LoginPolicy(lockout_s=float("nan"))
