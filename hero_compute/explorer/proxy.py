"""
The proxy behind ``explorer.call``, and the rules that keep anyone from aiming it
(CONTRACT §6).

A node registered from another host (its heartbeat came from a non-loopback address)
may not have the explorer connect to a loopback, link-local, unspecified or multicast
address: otherwise a heartbeat saying ``tcp://127.0.0.1:6379`` or
``tcp://169.254.169.254:80`` would turn the explorer into a way into its own host or its
cloud's metadata service.  Literal addresses are refused at the heartbeat; names are
resolved here, checked, and the connection goes to the very address that was checked.
Over TLS the handshake fails, before a byte is sent, unless the peer's certificate names
the node being called.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

# forbidden_target lives in rpc, shared with the node's image downloads; it is still
# importable from here.
from hero_compute.rpc.addresses import forbidden_target, parse_address
from hero_compute.rpc.errors import (
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    ResponseTooLarge,
    TransportError,
)
from hero_compute.rpc.limits import DEFAULTS
from hero_compute.rpc.throttle import REFUSALS_EVERY, Throttle, log_refusal
from hero_compute.rpc.tls import Expected

from .resolver import ResolveError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamClientEndpoint

    from hero_compute.rpc.addresses import Address
    from hero_compute.rpc.interfaces import IRpcClient

    from .registry import Registry


log = Logger()

#: Only these method families may be proxied: ``explorer.call`` must not become a way to
#: reach anything else a node (or whatever answers at a node's address) might serve.
PROXIED_PREFIXES = ("node.", "vm.", "image.")


@functools.lru_cache(maxsize=4096)
def _is_ip(host) -> bool:
    """:return: whether ``host`` is an IP address rather than a name"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def is_loopback(host: str | None) -> bool:
    """
    :return: whether ``host`` (an IP address as text, or None) is a loopback address

    Cached: every heartbeat over TCP asks about its peer (``ipaddress`` parsing was a
    few percent of a heartbeat).
    """
    if host is None:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class Proxy:
    """
    Calls a node on behalf of an ``explorer.call``.

    :param client: the :class:`~hero_compute.rpc.http_client.RpcClient` (with the
        explorer's TLS material, if any)
    :param registry: the :class:`~hero_compute.explorer.registry.Registry`
    :param call_timeout: seconds allowed for a proxied call
    :param resolve: ``resolve(host, port) -> Deferred of [ip, ...]``, failing with
        :class:`~hero_compute.explorer.resolver.ResolveError`: a
        :class:`~hero_compute.explorer.resolver.CachingResolver`'s
    :param calls_per_node: calls in flight to one node; more are -32003 busy at once
    :param calls_total: calls in flight in all; likewise
    """

    def __init__(
        self,
        client: IRpcClient,
        registry: Registry,
        call_timeout: float,
        resolve: Callable[[str, int], defer.Deferred[list[str]]],
        calls_per_node: int = DEFAULTS.calls_per_node,
        calls_total: int = DEFAULTS.calls_total,
    ) -> None:
        self._client = client
        # The pool's raw outcome read in our own callback (RpcClient.relay): a proxied
        # call's Deferred then runs one callback of the client's and ours less.  A
        # client without it (a test's) is called as any IRpcClient.
        self._relay: Any = getattr(client, "relay", None)
        self._outcome: Any = getattr(client, "outcome", None)
        self._registry = registry
        self.call_timeout = call_timeout
        self._resolve = resolve
        self._per_node_limit = calls_per_node
        self._total_limit = calls_total
        #: Calls in flight, per node id and in all: a batch of a thousand calls to a
        #: node that never answers must not take every descriptor the explorer has.
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.total = 0
        #: Calls refused busy, for metrics.
        self.busy = 0
        #: Calls whose reply was over the client's ``max_response`` (EXPLORER_MAX_REPLY),
        #: for metrics.
        self.too_large = 0
        # Refusals are logged as every limit's are (CONTRACT §7): a line per limit per
        # REFUSALS_EVERY at most, the rest counted into the next.  Made at the first
        # refusal, on the registry's clock.
        self._log: Throttle | None = None

    def call(self, node_id: str, method: str, params: Any = None) -> defer.Deferred[Any]:
        """
        Proxy a call to a node over its address.

        :return: a Deferred of the node's result, or its error unchanged
        """
        if not method.startswith(PROXIED_PREFIXES):
            raise RefusedByPolicy(
                "explorer.call proxies only node.*, vm.* and image.* methods, "
                f"not {method!r}"
            )
        record = self._registry.get(node_id)
        if self._registry.status(record) != "online":
            raise NodeOffline(
                f"node {node_id} is offline (last seen {record.last_seen:.0f})"
            )
        if (
            self.total >= self._total_limit
            or self.in_flight[node_id] >= self._per_node_limit
        ):
            self.busy += 1
            scope = "in all" if self.total >= self._total_limit else f"to node {node_id}"
            self._refused("calls_in_flight", "a call {scope}: busy", scope=scope)
            raise NodeUnreachable(
                f"busy: too many calls in flight {scope} (EXPLORER_CALLS_PER_NODE, "
                "EXPLORER_CALLS_TOTAL); try again shortly"
            )
        address = parse_address(record.socket_path)
        expect = Expected("node", node_id) if address.scheme == "tls" else None
        target = self._literal_target(address, record.remote)
        if isinstance(target, RefusedByPolicy):
            return defer.fail(target)
        in_flight = self.in_flight
        # dict's own get and pop: Counter's += and del are Python code.
        in_flight[node_id] = in_flight.get(node_id, 0) + 1
        self.total += 1
        # From here every path ends in _relayed or _finished, which give the slot back
        # (the client fails a request it cannot even encode in its Deferred).
        if target is not None and self._relay is not None:
            d = self._relay(target, method, params, self.call_timeout, expect)
            return d.addBoth(self._relayed, node_id, record.socket_path, target)
        if target is not None:
            # A Unix socket or an IP address: nothing to wait for before the call.
            d = self._send(target, method, params, expect)
        else:
            d = self._resolved(address, record.remote)
            d.addCallback(self._send, method, params, expect)
        return d.addBoth(self._finished, node_id, record.socket_path)

    def _send(self, target, method, params, expect) -> defer.Deferred[Any]:
        """The client's call to ``target``."""
        return self._client.call(
            target, method, params, timeout=self.call_timeout, expect=expect
        )

    def endpoint(
        self, node_id: str, reactor: Any, connect_timeout: float
    ) -> defer.Deferred[tuple[IStreamClientEndpoint, Address]]:
        """
        Where to open a connection of our own to a node (a console), with the checks of
        a call: online, the address policy, and over TLS the node's identity.

        :param reactor: the reactor to connect with
        :param connect_timeout: seconds allowed to connect
        :return: a Deferred of ``(endpoint, address)``: an ``IStreamClientEndpoint``
            and the :class:`~hero_compute.rpc.addresses.Address` it reaches
        :raise NodeNotFound: or NodeOffline, at once
        """
        record = self._registry.get(node_id)
        if self._registry.status(record) != "online":
            raise NodeOffline(f"node {node_id} is offline")
        address = parse_address(record.socket_path)
        creator = None
        if address.scheme == "tls" and self._client.tls is not None:
            creator = self._client.tls.expecting(Expected("node", node_id))
        target = self._literal_target(address, record.remote)
        if isinstance(target, RefusedByPolicy):
            return defer.fail(target)
        d = (
            defer.succeed(target)
            if target is not None
            else self._resolved(address, record.remote)
        )
        return d.addCallback(
            lambda t: (t.client_endpoint(reactor, connect_timeout, creator), t)
        )

    def _refused(self, limit: str, what: str, **fields: object) -> None:
        """Log a refusal by ``limit``, rate-limited (see :func:`log_refusal`)."""
        if self._log is None:
            self._log = Throttle(self._registry.clock, REFUSALS_EVERY)
        log_refusal(log, self._log, limit, what, **fields)

    def _relayed(self, raw, node_id, socket_path, target):
        """:meth:`_finished`, with the client's reading of the raw outcome first."""
        try:
            result = self._outcome(raw, target, self.call_timeout)
        except Exception:
            result = Failure()
        return self._finished(result, node_id, socket_path)

    def _finished(self, result, node_id, socket_path):
        """A call is over: room for another, and a transport failure is -32003."""
        self.total -= 1
        in_flight = self.in_flight
        left = in_flight[node_id] - 1
        if left:
            in_flight[node_id] = left
        else:
            in_flight.pop(node_id)
        if isinstance(result, Failure) and isinstance(result.value, TransportError):
            if isinstance(result.value, ResponseTooLarge):
                self.too_large += 1
                self._refused(
                    "max_reply",
                    "the reply of node {node_id} at {address}: over {most} bytes",
                    node_id=node_id,
                    address=socket_path,
                    most=result.value.limit,
                )
            raise NodeUnreachable(
                f"node {node_id} at {socket_path} is unreachable: {result.value.reason}"
            )
        return result

    def _literal_target(self, address, remote):
        """
        The address to connect to when it needs no resolving: a Unix socket, or an IP
        address (checked, for a node on another host); None for a name.

        :return: the :class:`~hero_compute.rpc.addresses.Address`, None, or the
            :class:`~hero_compute.rpc.errors.RefusedByPolicy` to fail with
        """
        if address.is_unix:
            return address
        if remote:
            reason = forbidden_target(address.host)
            if reason is not None:
                return RefusedByPolicy(f"{address.uri}: {reason}")
        return address if _is_ip(address.host) else None

    def _resolved(self, address, remote):
        """
        The address to connect to for a name: resolved (through the bounded resolver)
        and, for a node on another host, checked; -32010 if forbidden.
        """

        def check(hosts):
            if not hosts:
                raise NodeUnreachable(f"{address.uri}: the name resolves to nothing")
            if remote:
                for host in hosts:
                    reason = forbidden_target(host)
                    if reason is not None:
                        raise RefusedByPolicy(
                            f"{address.uri}: {address.host} resolves to "
                            f"{reason.split(' is ', 1)[1]} ({host})"
                        )
            host = hosts[0]
            literal = f"[{host}]" if ":" in host else host
            # Connect to the address just checked: resolving again could give another.
            return parse_address(f"{address.scheme}://{literal}:{address.port}")

        def failed(failure):
            failure.trap(ResolveError)
            raise NodeUnreachable(f"{address.uri}: {failure.getErrorMessage()}")

        return self._resolve(address.host, address.port).addCallbacks(check, failed)
