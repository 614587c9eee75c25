"""Security of the simulators: application certificates, folder trust lists, users and roles.

Layout of a PKI folder (``--pki DIR``)::

    DIR/own/<name>_cert.der, DIR/own/<name>_key.pem   generated on first run
    DIR/trusted/*.der|*.pem                           trusted client application certificates
    DIR/rejected/                                      certificates that were refused (copied
                                                       here so an administrator can trust them
                                                       by moving the file to trusted/)
    DIR/users.toml                                     users, roles and password hashes

The trust list is re-read on every session, so adding a certificate needs no restart. An
empty trust list is valid (it trusts nobody); asyncua's ``TrustStore.load`` raises on an empty
folder, so the simulator uses its own fingerprint check (:class:`FolderTrustList`).

Users file (TOML)::

    [users.apc]
    role = "apc"
    password = "pbkdf2_sha256$200000$<salt hex>$<hash hex>"   # hmpc-sim opcua-user

Roles: viewer, operator, apc, engineer (see :class:`sim.opcua.apc.Role`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import logging
import secrets
import socket
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from plant_models.config import check_keys
from plant_models.errors import ConfigError
from sim.opcua.apc import Role

__all__ = [
    "CALLING_USER",
    "FolderTrustList",
    "Identity",
    "RoleUserManager",
    "UserEntry",
    "ensure_certificate",
    "hash_password",
    "load_users",
    "verify_password",
    "write_user",
]

log = logging.getLogger(__name__)

#: Secure policies offered (docs/opcua.md); Basic128Rsa15 and Basic256 stay off.
SECURE_POLICIES: tuple[ua.SecurityPolicyType, ...] = (
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)

_PBKDF2 = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 200_000


@dataclasses.dataclass(frozen=True)
class Identity:
    """The authenticated caller of a service request."""

    name: str
    role: Role


#: The identity of the session whose request is being processed. Set by the server's
#: session class (:mod:`sim.opcua.server`) around Call and Write, read by method handlers,
#: which asyncua calls without the session.
CALLING_USER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "hmpc_opcua_calling_user", default=None
)


# -- passwords and users --------------------------------------------------------------------
def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A PBKDF2-SHA256 hash string ``pbkdf2_sha256$iterations$salt$hash`` (hex)."""
    if not password:
        raise ConfigError("empty passwords are not allowed")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{_PBKDF2}${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != _PBKDF2:
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclasses.dataclass(frozen=True)
class UserEntry:
    name: str
    role: Role
    password_hash: str


def load_users(path: Path) -> dict[str, UserEntry]:
    """Read a users file; every error names the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: users file not found; create users with `hmpc-sim opcua-user`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    check_keys(data, {"users"}, f"{path}")
    users: dict[str, UserEntry] = {}
    table = data.get("users", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [users] must be a table")
    for name, entry in table.items():
        where = f"{path}: users.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table with role and password")
        check_keys(entry, {"role", "password"}, where)
        try:
            role = Role(str(entry.get("role")))
        except ValueError:
            allowed = ", ".join(r.value for r in Role)
            raise ConfigError(f"{where}.role {entry.get('role')!r}; allowed: {allowed}") from None
        pw = entry.get("password")
        if not isinstance(pw, str) or not pw.startswith(_PBKDF2 + "$"):
            raise ConfigError(f"{where}.password must be a {_PBKDF2} hash (hmpc-sim opcua-user)")
        users[name] = UserEntry(name, role, pw)
    return users


def write_user(
    path: Path, name: str, role: Role, password: str, *, iterations: int = DEFAULT_ITERATIONS
) -> None:
    """Add or replace one user in a users file (created if missing)."""
    users = load_users(path) if path.exists() else {}
    users[name] = UserEntry(name, role, hash_password(password, iterations=iterations))
    lines = ["# hmpc OPC UA simulator users: roles viewer, operator, apc, engineer", ""]
    for entry in users.values():
        lines += [
            f'[users."{entry.name}"]',
            f'role = "{entry.role.value}"',
            f'password = "{entry.password_hash}"',
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)


class RoleUserManager:
    """asyncua user manager: username/password against the users file; anonymous and
    unknown users are refused (``None``). Every authenticated user gets asyncua's plain
    ``User`` role (never ``Admin``, which would bypass access levels); our role is looked
    up by name through :meth:`identity`."""

    def __init__(self, users: Mapping[str, UserEntry]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if not username or password is None:
            log.warning("login refused: anonymous or certificate user tokens are not accepted")
            return None
        entry = self._users.get(username)
        if entry is None or not verify_password(password, entry.password_hash):
            log.warning("login refused for user %r: unknown user or wrong password", username)
            return None
        log.info("login: %s (%s)", username, entry.role.value)
        return User(role=UserRole.User, name=username)

    def identity(self, user: Any) -> Identity | None:
        name = getattr(user, "name", None)
        entry = self._users.get(name) if isinstance(name, str) else None
        return Identity(entry.name, entry.role) if entry is not None else None


# -- certificates ----------------------------------------------------------------------------
async def ensure_certificate(pki: Path, name: str, app_uri: str) -> tuple[Path, Path]:
    """Create (first run) or reuse ``pki/own/<name>_cert.der`` and its key; the certificate's
    URI SAN is ``app_uri`` (which must equal the server's ApplicationUri)."""
    own = pki / "own"
    for sub in (own, pki / "trusted", pki / "rejected"):
        sub.mkdir(parents=True, exist_ok=True)
    cert, key = own / f"{name}_cert.der", own / f"{name}_key.pem"
    if cert.exists():
        uris = certificate_uris(cert.read_bytes())
        if app_uri not in uris:
            log.warning("%s: URI SAN %s != %s; regenerating", cert, uris, app_uri)
            cert.unlink()
    await setup_self_signed_certificate(
        key,
        cert,
        app_uri,
        socket.gethostname(),
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        {"countryName": "CH", "organizationName": "hmpc", "commonName": name},
    )
    key.chmod(0o600)
    return cert, key


def _load_cert(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def certificate_uris(data: bytes) -> list[str]:
    """The URI subject alternative names of a DER or PEM certificate."""
    cert = _load_cert(data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]


class FolderTrustList:
    """Certificate validator for asyncua: a client certificate is accepted when the same
    certificate (SHA-256 fingerprint) is in the trusted folder, it is within its validity
    period, and its URI SAN equals the ApplicationUri the client announces."""

    def __init__(self, trusted: Path, rejected: Path | None = None) -> None:
        self.trusted = trusted
        self.rejected = rejected

    def fingerprints(self) -> set[bytes]:
        out: set[bytes] = set()
        if not self.trusted.is_dir():
            return out
        for path in sorted(self.trusted.iterdir()):
            if path.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
                continue
            try:
                out.add(_load_cert(path.read_bytes()).fingerprint(hashes.SHA256()))
            except ValueError:
                log.warning("trust list: %s is not a certificate; ignored", path)
        return out

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        fingerprint = cert.fingerprint(hashes.SHA256())
        if fingerprint not in self.fingerprints():
            self._reject(cert, "not in the trust list")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        now = datetime.now(UTC)
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            self._reject(cert, "outside its validity period")
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        uris = certificate_uris(cert.public_bytes(serialization.Encoding.DER))
        if app.ApplicationUri not in uris:
            self._reject(cert, f"ApplicationUri {app.ApplicationUri!r} not in its URI SAN {uris}")
            raise ServiceError(ua.StatusCodes.BadCertificateUriInvalid)

    def _reject(self, cert: x509.Certificate, why: str) -> None:
        subject = cert.subject.rfc4514_string()
        log.warning("client certificate %s refused: %s", subject, why)
        if self.rejected is not None:
            self.rejected.mkdir(parents=True, exist_ok=True)
            name = cert.fingerprint(hashes.SHA256()).hex()[:16] + ".der"
            (self.rejected / name).write_bytes(uacrypto.der_from_x509(cert))
