"""A standard asyncua client with ``auto_reconnect=True`` in its own process (as an
integrator runs one): connects, subscribes to APC.Clock.ProcessTime every 100 ms and prints
each value received as ``value <process h>`` until its stdin closes.

    python reconnecting_client.py ENDPOINT CERT KEY APP_URI USER PASSWORD
"""

from __future__ import annotations

import asyncio
import sys

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256


class _Printer:
    def datachange_notification(self, node: object, val: object, data: object) -> None:
        print(f"value {val}", flush=True)


async def main(endpoint: str, cert: str, key: str, uri: str, user: str, password: str) -> None:
    client = Client(endpoint, timeout=10)
    client.application_uri = uri
    await client.set_security(
        SecurityPolicyBasic256Sha256, cert, key, mode=ua.MessageSecurityMode.SignAndEncrypt
    )
    client.set_user(user)
    client.set_password(password)
    await client.connect(auto_reconnect=True)
    try:
        ns = await client.get_namespace_index("urn:hmpc:sim")
        sub = await client.create_subscription(100, _Printer())
        await sub.subscribe_data_change(client.get_node(ua.NodeId("Clock.ProcessTime", ns)))
        print("subscribed", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await client.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
