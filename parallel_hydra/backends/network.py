"""Reaching a cluster by address, the same way for every engine.

Engines retry an unreachable address for the whole time-out, and say little about why.
Before an engine is asked to connect, the backend probes the address with plain TCP
connects: a host that refuses (nothing listens there) is known at once and reported
after a short grace (a head or scheduler may be just starting); a host that does not
answer at all is given the whole ``connect_timeout``.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Optional, Tuple

__all__ = ["split_host_port", "is_loopback", "wait_for_listener", "REFUSED_GRACE"]

#: Seconds a refused connection may go on before connecting gives up.
REFUSED_GRACE = 3.0


def split_host_port(address: str, expected: str) -> Tuple[str, int]:
    """``HOST:PORT`` (with an optional ``scheme://``, IPv6 in brackets) to a pair.

    ``expected`` says what forms the engine takes, for the error message.
    """
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"parallel config: address must be {expected}; got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wait_for_listener(host: str, port: int, deadline: float, what: str, hint: str) -> None:
    """Wait until ``host:port`` accepts a TCP connection, or raise ``ConnectionError``.

    ``what`` names the cluster as the user gave it (``the Dask scheduler at 'tcp://...'``)
    and ``hint`` says how to start one, so that the error is one to act on.
    """
    delay = 0.1
    refused_since: Optional[float] = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(remaining, 5.0))):
                return
        except OSError as exc:
            now = time.monotonic()
            remaining = deadline - now
            if isinstance(exc, ConnectionRefusedError):
                refused_since = now if refused_since is None else refused_since
            else:
                refused_since = None
            refused_long = refused_since is not None and now - refused_since >= REFUSED_GRACE
            if remaining <= 0 or refused_long:
                why = (
                    f"nothing listens at {host}:{port} (connection refused for {now - refused_since:.0f} s)"
                    if refused_long and refused_since is not None
                    else f"nothing accepted a connection at {host}:{port} within connect_timeout ({exc})"
                )
                raise ConnectionError(f"could not reach {what}: {why}. {hint}") from None
            time.sleep(min(delay, max(remaining, 0.0)))
            delay = min(delay * 2, 1.0)
