"""Create the test RSEs, scope, account limits and distances through the Rucio client API.

Runs inside the Rucio server's virtual environment with ``RUCIO_CONFIG`` pointing
at a client configuration of the root account. Its argument is a JSON file::

    {"scope": "demo", "account": "root", "rses": {"USDF_BUTLER_DISK": "/path/prefix", ...}}

Every RSE is deterministic with ``lfn2pfn_algorithm=identity`` and one ``file``
protocol (``rucio.rse.protocols.posix.Default``), so a file ``scope:name`` lives at
``<prefix>/<scope>/<name>``. Running it again changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rucio.client import Client
from rucio.common.exception import Duplicate, RSEProtocolNotSupported, RSEProtocolPriorityError


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    client = Client()
    account = spec["account"]
    for rse, prefix in spec["rses"].items():
        Path(prefix).mkdir(parents=True, exist_ok=True)
        try:
            client.add_rse(rse, deterministic=True)
        except Duplicate:
            pass
        client.add_rse_attribute(rse, "lfn2pfn_algorithm", "identity")
        client.add_rse_attribute(rse, "transfertool", "localcopy")
        client.add_rse_attribute(rse, "fts", "localcopy")
        try:
            has_protocol = bool(client.get_protocols(rse))
        except RSEProtocolNotSupported:
            has_protocol = False
        if not has_protocol:
            try:
                client.add_protocol(
                    rse,
                    {
                        "scheme": "file",
                        "hostname": "",
                        "port": 0,
                        "prefix": str(Path(prefix).resolve()) + "/",
                        "impl": "rucio.rse.protocols.posix.Default",
                        "domains": {
                            "lan": {"read": 1, "write": 1, "delete": 1},
                            "wan": {
                                "read": 1,
                                "write": 1,
                                "delete": 1,
                                "third_party_copy_read": 1,
                                "third_party_copy_write": 1,
                            },
                        },
                    },
                )
            except (Duplicate, RSEProtocolPriorityError):
                pass
        client.set_local_account_limit(account, rse, 10**15)
    for source in spec["rses"]:
        for destination in spec["rses"]:
            if source != destination:
                try:
                    client.add_distance(source, destination, {"distance": 1})
                except Duplicate:
                    pass
    try:
        client.add_scope(account, spec["scope"])
    except Duplicate:
        pass
    print(f"bootstrapped RSEs {sorted(spec['rses'])} and scope {spec['scope']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
