"""
Where a node may be reached: the checks on the address a heartbeat gives (CONTRACT §6),
so that the proxy can never be aimed where the node's peer could not itself reach.
"""

from hero_compute.rpc.addresses import AddressError, parse_address
from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy

from .proxy import forbidden_target


class Refused(RefusedByPolicy):
    """-32010 for a heartbeat, with the reason it is counted under in the metrics."""

    def __init__(self, reason: str, message: str) -> None:
        RefusedByPolicy.__init__(self, message)
        self.reason = reason


def checked_address(socket_path: str, transport: str, remote: bool) -> str:
    """
    :return: the canonical URI of a heartbeat's address
    :raise InvalidParams: it is no address
    :raise Refused: the node may not be reached there from this explorer

    :param transport: how the heartbeat came: ``"unix"``, ``"tcp"`` or ``"tls"``
    :param remote: it came from another host
    """
    try:
        address = parse_address(socket_path)
    except AddressError as e:
        error = InvalidParams(f"socket_path: {e}")
        error.reason = "socket_path"
        raise error from None
    if transport != "unix" and address.is_unix:
        raise Refused(
            "unix_address",
            f"a heartbeat over {transport.upper()} cannot claim the Unix "
            f"address {address.uri}: set NODE_TCP_ADDR or NODE_TLS_ADDR (and "
            "NODE_ADVERTISE_ADDR if needed) on the node",
        )
    if transport == "tls" and address.scheme != "tls":
        raise Refused(
            "tls_address",
            f"a node that heartbeats over TLS must be reached over TLS, not at "
            f"{address.uri}: set NODE_TLS_ADDR on the node",
        )
    if remote:
        reason = forbidden_target(address.host)
        if reason is not None:
            raise Refused(
                "forbidden_target",
                f"a node on another host may not advertise {address.uri}: {reason}",
            )
    return address.uri
