"""Security and robustness of the simulators against clients the project did not write
(issue 23): a rogue client with its own key pair and a trusted peer's public certificate,
login floods, restarts under an auto-reconnecting subscriber, publishing interval 0."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from asyncua import ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from opcua_testkit import Pki, SimThread, node, rogue_session, session

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
