"""Users file, password hashes, certificates and the folder trust list (no network)."""

from __future__ import annotations

import asyncio
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
