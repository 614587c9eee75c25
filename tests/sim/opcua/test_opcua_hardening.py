"""Security and robustness of the simulators against clients the project did not write
(issue 23): a rogue client with its own key pair and a trusted peer's public certificate,
login floods, restarts under an auto-reconnecting subscriber, publishing interval 0."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.subscription import Subscription
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from opcua_testkit import (
    CLIENT_URI,
    PASSWORDS,
    POLICIES,
    Pki,
    SimThread,
    _Client,
    node,
    own_sim,
    rogue_session,
    session,
    wrong_logins,
)

from sim.opcua.faults import Fault
from sim.opcua.hardened import MIN_PUBLISHING_INTERVAL_MS
from sim.opcua.security import LoginPolicy

pytestmark = pytest.mark.integration

POLICY_NAMES = ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
MODES = [ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt]


def _thumbprint(path: Path) -> str:
    """The OPC UA thumbprint (SHA-1 of the DER certificate, as the server logs it)."""
    cert = x509.load_der_x509_certificate(path.read_bytes())
    return cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - OPC UA's thumbprint is SHA-1


# -- 1. the channel certificate is the client's identity ----------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize(
    "case",
    [
        "untrusted channel, trusted peer's certificate claimed",
        "untrusted channel, no certificate claimed",
        "trusted channel, no certificate claimed",
        "trusted channel, another trusted certificate claimed",
    ],
)
def test_rogue_channel_certificate_is_refused(
    sim: SimThread,
    pki: Pki,
    policy: str,
    mode: ua.MessageSecurityMode,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rogue client opens the secure channel with a key pair of its own and claims another
    certificate (or none) in CreateSession: refused, logged with address and thumbprint,
    and it cannot write (it wrote Heartbeat 0 -> 7 before, issue 23)."""
    trusted_channel = case.startswith("trusted")
    assert pki.other_trusted_cert is not None
    claimed = {
        "trusted peer's certificate claimed": pki.client_cert.read_bytes(),
        "no certificate claimed": None,
        "another trusted certificate claimed": pki.other_trusted_cert.read_bytes(),
    }[case.split(", ")[1]]
    channel_cert = pki.client_cert if trusted_channel else pki.untrusted_cert

    async def go() -> tuple[str, int]:
        async with session(sim.s.endpoint, pki, "apc", policy=policy, mode=mode) as good:
            hb = await node(good, "APC.BR02.Heartbeat")
            before = int(await hb.read_value())
            outcome = "connected"
            try:
                async with rogue_session(
                    sim.s.endpoint,
                    pki,
                    claimed,
                    policy=policy,
                    mode=mode,
                    trusted_channel=trusted_channel,
                ) as rogue:
                    rogue_hb = await node(rogue, "APC.BR02.Heartbeat")
                    await rogue_hb.write_value(ua.Variant(before + 7, ua.VariantType.UInt32))
                    outcome = "wrote"
            except ua.UaStatusCodeError as exc:
                outcome = type(exc).__name__
            return outcome, int(await hb.read_value()) - before

    with caplog.at_level(logging.WARNING, logger="sim.opcua"):
        outcome, change = asyncio.run(go())
    refused = ("BadCertificateUntrusted", "BadCertificateInvalid", "BadSecurityChecksFailed")
    assert outcome in refused
    assert change == 0
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("127.0.0.1" in m and _thumbprint(channel_cert) in m for m in refusals), refusals


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_session_cannot_be_taken_over_from_another_channel(
    sim: SimThread, pki: Pki, mode: ua.MessageSecurityMode, caplog: pytest.LogCaptureFixture
) -> None:
    """ActivateSession with another session's AuthenticationToken (readable on a Sign-only
    channel) over a channel opened with another, even trusted, certificate: refused; the
    session stays its owner's."""
    assert pki.other_trusted_cert is not None and pki.other_trusted_key is not None
    other_cert, other_key = pki.other_trusted_cert, pki.other_trusted_key

    async def go() -> tuple[str, float]:
        async with session(sim.s.endpoint, pki, "apc", mode=mode) as victim:
            token = victim.uaclient.protocol.authentication_token
            thief = _Client(sim.s.endpoint, timeout=10)
            thief.application_uri = CLIENT_URI
            await thief.set_security(
                POLICIES["Basic256Sha256"], str(other_cert), str(other_key), mode=mode
            )
            outcome = "activated"
            try:
                await thief.connect_socket()
                await thief.send_hello()
                await thief.open_secure_channel()
                thief.uaclient.protocol.authentication_token = token
                thief._server_nonce = victim._server_nonce
                thief._policy_ids = victim._policy_ids
                await thief.activate_session("viewer", PASSWORDS["viewer"])
            except ua.UaStatusCodeError as exc:
                outcome = type(exc).__name__
            finally:
                thief.disconnect_socket()
                await asyncio.sleep(0.01)
            value = float(await (await node(victim, "Clock.ProcessTime")).read_value())
            return outcome, value

    with caplog.at_level(logging.WARNING, logger="sim.opcua"):
        outcome, value = asyncio.run(go())
    assert outcome == "BadSecurityChecksFailed"
    assert value >= 0  # the owner's session still works
    assert any(
        "ActivateSession on a channel" in r.getMessage()
        and _thumbprint(other_cert) in r.getMessage()
        for r in caplog.records
    )


# -- 4. restarts and publishing intervals -------------------------------------------------------
class _Values:
    """Subscription handler that ignores what it receives."""

    def datachange_notification(self, node: object, val: object, data: object) -> None:
        pass


def test_restart_completes_under_a_subscribed_auto_reconnecting_client(pki: Pki) -> None:
    """The restart fault completed only after such a client went away (issue 23): the
    client reconnected between asyncua closing the connections and the listening socket,
    and asyncua's stop waited for that connection. The client runs in its own process,
    as an integrator's does. A simulator of its own: the shared one's login guard may hold
    127.0.0.1 in a lock-out after the rogue-client tests. The client's own reconnect back-off
    (1, 2, 4, ... 32 s) decides when values arrive again, hence the long wait for them."""
    with own_sim(pki) as sim:
        _restart_under_reconnecting_client(sim, pki)


def _restart_under_reconnecting_client(sim: SimThread, pki: Pki) -> None:
    async def go() -> tuple[int, float, float]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("reconnecting_client.py")),
            sim.s.endpoint,
            str(pki.client_cert),
            str(pki.client_key),
            CLIENT_URI,
            "viewer",
            PASSWORDS["viewer"],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdout = proc.stdout

        async def value_after(t: float) -> float:
            while True:
                line = (await stdout.readline()).decode()
                if not line:
                    raise AssertionError("the client process ended")
                if line.startswith("value ") and float(line.split()[1]) > t:
                    return float(line.split()[1])

        try:
            first = await asyncio.wait_for(value_after(-1.0), 60)
            done = sim.s.restarts_done

            async def inject() -> None:
                sim.s.faults.add(Fault("restart", "*", sim.s.process_h(), 1.0))

            sim.run(inject)
            for _ in range(600):  # event-driven: the restart counter, up to 60 s
                if sim.s.restarts_done > done:
                    break
                await asyncio.sleep(0.1)
            restarted_at = sim.s.process_h()
            # the client reconnects and re-creates its subscription by itself
            after = await asyncio.wait_for(value_after(restarted_at), 240)
            return sim.s.restarts_done - done, first, after
        finally:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    count, first, after = asyncio.run(go())
    assert count == 1, "the restart did not complete within 60 s"
    assert after > first


def test_publishing_interval_zero_is_revised_to_the_minimum(sim: SimThread, pki: Pki) -> None:
    async def go() -> list[float]:
        async with session(sim.s.endpoint, pki, "viewer") as client:
            revised = []
            for requested in (0.0, -5.0, 10.0, 500.0):
                params = ua.CreateSubscriptionParameters(
                    RequestedPublishingInterval=requested,
                    RequestedLifetimeCount=ua.UInt32(300),
                    RequestedMaxKeepAliveCount=ua.UInt32(10),
                    PublishingEnabled=True,
                )
                sub = Subscription(client.uaclient.session, params, _Values())
                result = await sub.init()
                revised.append(float(result.RevisedPublishingInterval))
                await sub.delete()
            return revised

    assert asyncio.run(go()) == [MIN_PUBLISHING_INTERVAL_MS] * 3 + [500.0]


# -- 2. login floods -----------------------------------------------------------------------------
def test_login_flood_locks_out_and_the_legitimate_client_stays_connected(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong logins from 10 connections at once while a legitimate apc client is subscribed
    and reading: the address is locked out (even the right password is refused, logged),
    the legitimate session is never lost and keeps reading and receiving. Latency is
    measured by ``hmpc-sim bench login-flood``, not asserted here."""
    policy = LoginPolicy(max_failures=5, lockout_s=600.0, backoff_s=0.05, hash_workers=1)
    with own_sim(pki, login=policy) as sim:

        async def go() -> dict[str, Any]:
            lost: list[Exception] = []
            notified: list[float] = []

            class Handler:
                def datachange_notification(self, node: object, val: object, data: object) -> None:
                    if isinstance(val, float):
                        notified.append(val)

            async def on_lost(exc: Exception) -> None:
                lost.append(exc)

            async with session(sim.s.endpoint, pki, "apc") as good:
                good.connection_lost_callback = on_lost
                clock = await node(good, "Clock.ProcessTime")
                sub = await good.create_subscription(100, Handler())
                await sub.subscribe_data_change(clock)
                reads: list[float] = []
                flood = asyncio.gather(*(wrong_logins(sim.s.endpoint, pki, 4) for _ in range(10)))
                while not flood.done():
                    reads.append(float(await clock.read_value()))
                    await asyncio.sleep(0.05)
                outcomes = [o for conn in await flood for o in conn]
                before = len(notified)
                right = await wrong_logins(sim.s.endpoint, pki, 1, password=PASSWORDS["apc"])
                reads.append(float(await clock.read_value()))
                for _ in range(100):
                    if len(notified) > before:
                        break
                    await asyncio.sleep(0.1)
                return {
                    "outcomes": outcomes,
                    "right": right,
                    "lost": lost,
                    "reads": reads,
                    "more_notifications": len(notified) > before,
                }

        with caplog.at_level(logging.WARNING, logger="sim.opcua"):
            out = asyncio.run(go())
    assert out["outcomes"] and "Good" not in out["outcomes"]
    assert set(out["outcomes"]) <= {"BadUserAccessDenied", "BadTooManyOperations"}
    assert out["right"] == ["BadUserAccessDenied"]  # locked out: the right password too
    assert out["lost"] == []
    assert out["reads"] == sorted(out["reads"]) and len(out["reads"]) >= 2
    assert out["more_notifications"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("locked out for 600 s" in m and "127.0.0.1" in m for m in messages)
    assert any("apc" in m and "client locked out" in m for m in messages)


def test_connections_without_a_session_are_capped(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond ``max_unauthenticated`` idle connections, a new one is closed on arrival; an
    activated session does not count."""
    policy = LoginPolicy(max_unauthenticated=3)
    with own_sim(pki, login=policy) as sim:
        port = sim.config.port

        async def go() -> tuple[str, bool, bool]:
            async with session(sim.s.endpoint, pki, "viewer"):
                idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
                await asyncio.sleep(0.5)
                try:
                    async with session(sim.s.endpoint, pki, "viewer"):
                        refused = "connected"
                except (ua.UaError, ConnectionError, OSError, TimeoutError) as exc:
                    refused = type(exc).__name__
                for _, writer in idle:
                    writer.close()
                    await writer.wait_closed()
                for _ in range(50):  # the server sees the idle connections go
                    try:
                        async with session(sim.s.endpoint, pki, "viewer"):
                            return refused, True, True
                    except (ua.UaError, ConnectionError, OSError, TimeoutError):
                        await asyncio.sleep(0.2)
                return refused, False, True

        with caplog.at_level(logging.WARNING):
            refused, later, _ = asyncio.run(go())
    # the server answers BadTcpNotEnoughResources; asyncua's client logs it but may leave
    # its pending Hello to time out, so the exception type is not asserted
    assert refused != "connected"
    messages = [r.getMessage() for r in caplog.records]
    assert any("connections without an activated session (limit 3)" in m for m in messages)
    assert any("BadTcpNotEnoughResources" in m for m in messages)  # the client was told
    assert later
