"""``[http] listen`` addresses, parsed without pydantic.

Apart from the models so that ``ag1-fleet status`` and the other control
commands, which only need the address, start without importing pydantic.
"""

from __future__ import annotations

import ipaddress
import re


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); port 0 means any free port.

    :raises ValueError: with a one-line reason.
    """
    hint = "expected host:port, e.g. '127.0.0.1:8765' or '[::1]:8765'"
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError(f"invalid listen address {value!r}: {hint}")
        host, port_text = value[1:end], value[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {value!r}: bad IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"invalid listen address {value!r}: {hint}")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ValueError(f"invalid listen address {value!r}: bad host {host!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"invalid listen address {value!r}: port must be 0..65535")
    return host, int(port_text)
