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

import asyncio
import collections
import contextvars
import dataclasses
import hashlib
import hmac
import logging
import math
import secrets
import socket
import time
import tomllib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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
    "LoginGuard",
    "LoginPolicy",
    "RoleUserManager",
    "UserEntry",
    "ensure_certificate",
    "first_certificate",
    "hash_password",
    "load_users",
    "thumbprint",
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
        """Synchronous check (PBKDF2, ~0.2 s): the servers call :meth:`check` through
        :class:`LoginGuard`, off the event loop, instead."""
        if not username or password is None:
            log.warning("login refused: anonymous or certificate user tokens are not accepted")
            return None
        user = self.check(username, password)
        if user is None:
            log.warning("login refused for user %r: unknown user or wrong password", username)
        return user

    def check(self, username: str, password: str) -> User | None:
        """The user if the password is right (no logging; safe to run in a worker thread).
        An unknown user costs a hash too, so timing does not tell which names exist."""
        entry = self._users.get(username)
        if entry is None:
            verify_password(password, _DUMMY_HASH)
            return None
        if not verify_password(password, entry.password_hash):
            return None
        return User(role=UserRole.User, name=username)

    def identity(self, user: Any) -> Identity | None:
        name = getattr(user, "name", None)
        entry = self._users.get(name) if isinstance(name, str) else None
        return Identity(entry.name, entry.role) if entry is not None else None


_DUMMY_HASH = (
    f"{_PBKDF2}${DEFAULT_ITERATIONS}${'00' * 16}${'00' * 32}"  # never matches: 32 zero bytes
)


# -- login guard: off-loop hashing, back-off, lock-out ------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoginPolicy:
    """Limits on password logins (docs/opcua.md, Security).

    Attributes:
        max_failures: wrong logins from one address within ``failure_window_s`` that lock the
            address out (0: never).
        failure_window_s: how long a wrong login counts.
        lockout_s: how long a locked-out address is refused, even with the right password.
        backoff_s: the refusal of the first wrong login from an address is delayed this long,
            doubling with each further one up to ``backoff_max_s`` (the delay is a sleep: it
            costs the server nothing).
        hash_workers: threads that run the password hash (PBKDF2 releases the GIL).
        max_pending_logins: password checks waiting or running at once; more are refused at
            once with BadTooManyOperations (no hash).
        max_unauthenticated: TCP connections without an activated session; more are closed on
            arrival.
    """

    max_failures: int = 5
    failure_window_s: float = 300.0
    lockout_s: float = 60.0
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    hash_workers: int = 2
    max_pending_logins: int = 8
    max_unauthenticated: int = 32

    def __post_init__(self) -> None:
        for name in ("failure_window_s", "lockout_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"login policy: {name} must be >= 0, got {value!r}")
        if self.max_failures < 0:
            raise ConfigError(f"login policy: max_failures must be >= 0, got {self.max_failures}")
        for name in ("hash_workers", "max_pending_logins", "max_unauthenticated"):
            if getattr(self, name) < 1:
                raise ConfigError(f"login policy: {name} must be >= 1, got {getattr(self, name)}")


class LoginGuard:
    """Checks passwords in a bounded worker pool, delays refusals (back-off) and locks out an
    address after repeated failures. One per server; :meth:`close` ends its threads.

    Keyed by the client: its IP address and the thumbprint of its (trusted, channel-checked)
    certificate. A flood cannot lock out a controller on another machine, nor one on the
    same machine with its own certificate (seen with an address-only key: a second trusted
    client on the controller's host kept ``apc`` out for as long as it sent wrong
    passwords); a per-user lock-out would let anyone lock out ``apc``."""

    def __init__(
        self,
        users: RoleUserManager,
        policy: LoginPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users = users
        self.policy = policy
        self._clock = clock
        self._pool = ThreadPoolExecutor(policy.hash_workers, thread_name_prefix="hmpc-login")
        self._failures: dict[str, collections.deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._pending = 0
        self.refused_busy = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def locked(self, client: str) -> bool:
        """Whether ``client`` (address and certificate thumbprint) is locked out now."""
        until = self._locked_until.get(client)
        if until is None:
            return False
        if self._clock() >= until:
            del self._locked_until[client]
            self._failures.pop(client, None)
            log.warning("login lock-out of %s ended", client)
            return False
        return True

    def _recent_failures(self, client: str) -> collections.deque[float]:
        times = self._failures.setdefault(client, collections.deque())
        horizon = self._clock() - self.policy.failure_window_s
        while times and times[0] < horizon:
            times.popleft()
        return times

    async def login(
        self, username: str, password: str, *, address: str, thumbprint: str
    ) -> User | None:
        """The user, or None (refused, logged). Raises ``ServiceError(BadTooManyOperations)``
        when ``max_pending_logins`` checks are already under way."""
        who = f"user {username!r} from {address} (certificate thumbprint {thumbprint})"
        client = f"{address} with certificate {thumbprint}" if thumbprint else address
        if self.locked(client):
            log.warning("login refused for %s: client locked out", who)
            return None
        if self._pending >= self.policy.max_pending_logins:
            self.refused_busy += 1
            log.warning(
                "login refused for %s: %d password checks already pending",
                who,
                self._pending,
            )
            raise ServiceError(ua.StatusCodes.BadTooManyOperations)
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            user = await loop.run_in_executor(self._pool, self.users.check, username, password)
        finally:
            self._pending -= 1
        if self.locked(client):  # locked while this check ran: refuse even a right password
            log.warning("login refused for %s: client locked out", who)
            return None
        if user is not None:
            log.info("login: %s", who)
            return user
        failures = self._recent_failures(client)
        failures.append(self._clock())
        n = len(failures)
        if self.policy.max_failures and n >= self.policy.max_failures:
            self._locked_until[client] = self._clock() + self.policy.lockout_s
            log.warning(
                "login refused for %s: wrong password or unknown user; %d failures, client "
                "locked out for %.0f s",
                who,
                n,
                self.policy.lockout_s,
            )
            return None
        delay = min(self.policy.backoff_s * 2 ** (n - 1), self.policy.backoff_max_s)
        log.warning(
            "login refused for %s: wrong password or unknown user (%d recent failures; "
            "answered after %.2f s)",
            who,
            n,
            delay,
        )
        await asyncio.sleep(delay)
        return None


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


def first_certificate(der: bytes) -> bytes:
    """The leading certificate of a DER blob that may hold a chain (OPC UA allows chains in
    SenderCertificate and ClientCertificate)."""
    if len(der) < 2 or der[0] != 0x30:
        return der
    first = der[1]
    if first < 0x80:
        return der[: 2 + first]
    count = first & 0x7F
    length = int.from_bytes(der[2 : 2 + count], "big")
    return der[: 2 + count + length]


def thumbprint(der: bytes) -> str:
    """The OPC UA thumbprint of a certificate: SHA-1 of its DER, hex."""
    return hashlib.sha1(first_certificate(der), usedforsecurity=False).hexdigest()


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

    def is_trusted(self, der: bytes) -> bool:
        """Whether this DER certificate is in the trusted folder (no other check)."""
        try:
            cert = _load_cert(der)
        except ValueError:
            return False
        return cert.fingerprint(hashes.SHA256()) in self.fingerprints()

    def reject(self, der: bytes, why: str) -> None:
        """Log a refused certificate and copy it to the rejected folder."""
        try:
            cert = _load_cert(der)
        except ValueError:
            log.warning("client certificate refused: not a certificate (%s)", why)
            return
        self._reject(cert, why)

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
