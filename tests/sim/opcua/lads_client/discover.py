"""Run by test_opcua_lads_client.py in its own Python >= 3.12 venv (build/lads-venv, made by
sim/opcua/setup_lads_client.sh): the PyPI lads-opcua-client discovers the simulator's LADS
devices, functional units and functions over a secure session, and prints them as JSON.

Usage: python discover.py ENDPOINT CERT KEY APP_URI USER PASSWORD
"""

from __future__ import annotations

import asyncio
import json
import sys

from asyncua import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from lads_opcua_client import Server


async def main(endpoint: str, cert: str, key: str, uri: str, user: str, password: str) -> None:
    client = Client(endpoint)
    client.application_uri = uri
    await client.set_security(SecurityPolicyBasic256Sha256, cert, key)
    client.set_user(user)
    client.set_password(password)
    async with client:
        server = Server(client)
        await server.init()
        out = {
            "initialized": server.initialized,
            "devices": [d.display_name for d in server.devices],
            "functional_units": [
                {
                    "name": fu.display_name,
                    "functions": {
                        f.display_name: type(f).__name__ for f in fu.function_set.functions
                    },
                }
                for fu in server.functional_units
            ],
        }
        server.running = False
    await asyncio.sleep(0.05)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
