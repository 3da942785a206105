"""
The node's RPC methods and the service tree that serves them and heartbeats explorers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from hero_compute.rpc.addresses import Address, ListenAddress
from hero_compute.rpc.authz import NODE_POLICY
from hero_compute.rpc.dispatch import service_dispatcher
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.websocket_server import Routes

from .advertise import Advertiser, HeartbeatPayload
from .enroll import TLSFiles
from .heartbeat import HeartbeatLoop
from .images import Images
from .methods import NodeMethods
from .metrics import make_metrics
from .qemu.console import console_route
from .qemu.images import default_image_dirs
from .secret import load_or_create_secret
from .tls import NodeTLS
from .tls_client import ClientSide

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from hero_compute.rpc.context import CallContext
    from hero_compute.rpc.dispatch import Dispatcher
    from hero_compute.rpc.interfaces import IRpcClient
    from hero_compute.rpc.tls import ClientTLS

    from .vms import IVmManager

log = Logger()

#: Seconds allowed for the goodbyes sent to explorers on a graceful stop.
LEAVE_TIMEOUT = 2.0


def load_node_id(state_dir: str) -> str:
    """
    The node's persisted id, generated on first use.

    :param state_dir: the node's state directory
    :return: the id
    """
    path = os.path.join(state_dir, "node_id")
    try:
        with open(path) as f:
            node_id = f.read().strip()
        if node_id:
            return node_id
    except FileNotFoundError:
        pass
    node_id = uuid.uuid4().hex
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return node_id


@attrs.define
class NodeIdentity:
    """
    Who this node is.  The id is fixed by configuration, or read (made on first use) in
    the state directory when the node starts, never while its tree is being built.

    :ivar state_dir: the node's state directory
    :ivar node_id: the id, or None until :meth:`load` has run
    :ivar name: the node's human name
    :ivar secret: the node secret sent in heartbeats and leaves, or None until
        :meth:`load` has run
    :ivar labels: the node's labels (``NODE_LABELS``), sent in every full heartbeat
    """

    state_dir: str
    node_id: str | None = None
    name: str = ""
    labels: dict = attrs.field(factory=dict, kw_only=True)
    secret: str | None = attrs.field(default=None, repr=False)

    def load(self) -> str:
        """
        Read (or make) the persisted id and secret, unless they are known already.

        :return: the id
        :raise ~hero_compute.node.secret.SecretError: if the secret file is unusable
        """
        if self.node_id is None:
            self.node_id = load_node_id(self.state_dir)
        if self.secret is None:
            self.secret = load_or_create_secret(self.state_dir)
        return self.node_id


def authorize(context: CallContext, method: str, params: Any) -> None:
    """
    The node's column of the roles table (CONTRACT §6), for the dispatcher: Unix callers,
    ``client/*`` and ``explorer/*`` certificates may call everything, ``node/*`` nothing,
    a TLS peer without a certificate only ``rpc.discover``, plain TCP as before.

    :raise ~hero_compute.rpc.errors.RefusedByPolicy: -32010 for anything else
    """
    NODE_POLICY.check(context.transport, context.identity, method, params)


def _authorize_route(context: CallContext, route: str, params: Any) -> None:
    NODE_POLICY.check_route(context.transport, context.identity, route, params)


class NodeService(service.MultiService):
    """
    The node's root service; :func:`make_node` builds it and its children.

    :param identity: the :class:`NodeIdentity`
    :param vms: the :class:`~hero_compute.node.vms.IVmManager`
    :param client: the :class:`~hero_compute.rpc.interfaces.IRpcClient` heartbeats and
        goodbyes go through, closed when the node stops
    :param rpc: the :class:`~hero_compute.rpc.dispatch.Dispatcher` serving the methods
    :param listeners: the :class:`Listeners`
    :param advertiser: the :class:`~hero_compute.node.advertise.Advertiser`
    :param heartbeats: the :class:`HeartbeatLoop` s, one per explorer
    :param tls: the :class:`~hero_compute.node.enroll.NodeTLS`, or None without TLS
    """

    def __init__(
        self,
        identity: NodeIdentity,
        vms: IVmManager,
        client: IRpcClient,
        rpc: Dispatcher,
        listeners: Listeners,
        advertiser: Advertiser,
        heartbeats: Iterable[HeartbeatLoop],
        tls: NodeTLS | None = None,
    ) -> None:
        service.MultiService.__init__(self)
        self.identity = identity
        self.vms = vms
        self.client = client
        self.rpc = rpc
        self.listeners = listeners
        self.advertiser = advertiser
        self.heartbeats = list(heartbeats)
        self.tls = tls

    @property
    def node_id(self) -> str | None:
        """The node's id; None until it starts, unless configured."""
        return self.identity.node_id

    # Twisted's Service.name is a service's name in its parent; this one is the root
    # of the node's tree, whose name (read-only) is the node's.
    @property
    def name(self) -> str:  # type: ignore[override]
        """The node's human name."""
        return self.identity.name

    def privilegedStartService(self) -> None:
        self.identity.load()
        if self.tls is not None:
            # Before the listeners bind, so that a TLS listener that cannot bind (or
            # material that cannot be used) aborts start-up like the others.
            self.tls.prepare()
        service.MultiService.privilegedStartService(self)

    def startService(self) -> None:
        self.identity.load()
        log.info("node {node_id} ({name}) starting", node_id=self.node_id, name=self.name)
        service.MultiService.startService(self)

    def stopService(self) -> defer.Deferred[None]:
        # Stop heartbeating first (a heartbeat arriving after our goodbye would bring us
        # back online), then say goodbye while the listeners still run: explorers mark
        # us offline at once instead of after NODE_OFFLINE_AFTER.
        for loop in self.heartbeats:
            loop.stopService()
        goodbyes = [
            self.client.call(
                loop.address, "explorer.leave", self._leave_params(), timeout=LEAVE_TIMEOUT
            ).addErrback(lambda f: None)
            for loop in self.heartbeats
            # Every explorer that ever accepted us, not only those whose last heartbeat
            # went through: one slow answer must not leave us shown online until
            # NODE_OFFLINE_AFTER.  One never reached costs at most LEAVE_TIMEOUT.
            if loop.state.last_ok is not None
        ]
        d = defer.gatherResults(goodbyes)
        d.addBoth(lambda _: service.MultiService.stopService(self))
        return d.addBoth(lambda _: self.client.close())

    def _leave_params(self):
        params = {"node_id": self.node_id}
        if self.identity.secret is not None:
            params["secret"] = self.identity.secret
        return params


def make_node(
    *,
    reactor: Any,
    clock: IReactorTime,
    socket_path: str,
    tcp: ListenAddress | None,
    listen: Iterable[Listen | str],
    explorers: Sequence[Address],
    vms: IVmManager,
    state_dir: str,
    interval: float,
    node_id: str | None = None,
    name: str = "",
    labels: Mapping[str, str] | None = None,
    advertise: Address | None = None,
    tls: ListenAddress | None = None,
    tls_files: TLSFiles | None = None,
    join_token: str | None = None,
    ca_pin: str | None = None,
    stop: Callable[[], object] | None = None,
    limits: Limits | None = None,
    metrics: Listen | None = None,
    images: Images | None = None,
    sources: Mapping[str, str] | None = None,
) -> NodeService:
    """
    Build the node's service tree; nothing is opened and no file is read or written
    until it starts::

        NodeService
        ├── "listeners": Listeners (Unix socket, TCP, more) -> HTTP factory -> Dispatcher
        ├── "vms": the VM manager, when it is a service
        ├── "images": the base images and their imports (node.images, image.import)
        ├── "heartbeat <explorer URI>": one HeartbeatLoop per unix/tcp explorer
        │       -> HeartbeatPayload -> Advertiser
        ├── "tls": NodeTLS, when TLS is used: loads or enrolls for the material, then
        │   adds the TLS listener to "listeners" and starts its children,
        │   "heartbeat tls://...", one per tls:// explorer; renews the certificate
        └── "metrics": GET /metrics and the reactor's lag, when asked for

    :param reactor: the reactor to listen and connect with
    :param clock: an ``IReactorTime`` scheduling the heartbeats
    :param socket_path: the node's Unix socket path
    :param tcp: a :class:`ListenAddress` to also listen on, or None
    :param listen: further :class:`~hero_compute.rpc.listen.Listen` records (or
        Twisted server endpoint strings, as ``--listen`` takes them)
    :param explorers: :class:`Address` es of the explorers to heartbeat
    :param vms: an :class:`~hero_compute.node.vms.IVmManager` (an ``IService`` too when
        it has one)
    :param state_dir: where the node id lives
    :param interval: seconds between heartbeats
    :param node_id: a fixed id, or None to use the persisted one
    :param name: the node's human name
    :param labels: the node's labels, ``{key: value}`` (CONTRACT §9)
    :param advertise: the ``tcp://`` or ``tls://`` :class:`Address` (its host) reported
        to remote explorers, or None to derive it
    :param tls: a :class:`ListenAddress` to serve mutual TLS on, or None
    :param tls_files: the :class:`~hero_compute.node.enroll.TLSFiles`; default under
        ``state_dir/tls``
    :param join_token: a join token to enroll with, when there is no certificate yet
    :param ca_pin: the fleet CA's pin, ``sha256:<64 hex>``, to enroll with
    :param stop: called when the node cannot go on (enrollment refused); by default
        nothing is stopped but the enrollment
    :param limits: the :class:`~hero_compute.rpc.limits.Limits` (defaults otherwise)
    :param metrics: a :class:`~hero_compute.rpc.listen.Listen` to serve Prometheus
        metrics on (``GET /metrics``), or None for none
    :param images: the :class:`~hero_compute.node.images.Images`; by default those of
        ``state_dir/images``, with the default limits
    :param sources: the variable or option that set each listener, by ``"socket"``,
        ``"tcp"`` and ``"tls"``, named when one cannot bind
    :return: the :class:`NodeService`
    """
    identity = NodeIdentity(state_dir, node_id, name, labels=dict(labels or {}))
    tls_explorers = [address for address in explorers if address.scheme == "tls"]
    uses_tls = bool(tls_explorers) or tls is not None
    client_side = ClientSide() if uses_tls else None
    # ClientSide stands in for the ClientTLS it will point at once enrolled.
    client = RpcClient(reactor, timeout=interval, tls=cast("ClientTLS | None", client_side))
    limits = limits or Limits()
    rpc = service_dispatcher("node", limits, authorize, reactor)
    sources = {"socket": "--socket", "tcp": "--tcp", "tls": "--tls", **(sources or {})}
    listens: list[Listen | str] = [Listen.unix(socket_path, sources["socket"])]
    if tcp is not None:
        listens.append(Listen.tcp(tcp, sources["tcp"]))
    listens.extend(listen)
    factory = make_factory(rpc, limits=limits)
    if hasattr(vms, "console"):
        factory.upgrade = Routes(
            [console_route(vms.console)], _authorize_route, limits.max_unsent, reactor
        )
    # rpc/listeners.py annotates its factory as a bare Factory, which mypy reads as
    # generic in a type variable: it takes any protocol factory.
    listeners = Listeners(
        factory,  # type: ignore[arg-type]
        listens,
        [os.path.dirname(socket_path)],
        reactor,
        role="node",
    )
    advertiser = Advertiser(
        unix=Address("unix", path=socket_path),
        client=client,
        listeners=listeners,
        tcp=tcp,
        advertise=advertise,
        tls=tls,
    )
    payload = HeartbeatPayload(identity=identity, advertiser=advertiser, vms=vms)
    heartbeats = [
        HeartbeatLoop(clock, client, address, payload.params, interval)
        for address in explorers
    ]
    node_tls = None
    if client_side is not None:  # TLS is used
        node_tls = NodeTLS(
            reactor=reactor,
            clock=clock,
            files=tls_files or TLSFiles.in_state_dir(state_dir),
            identity=identity,
            listeners=listeners,
            factory=factory,
            listen=None if tls is None else Listen.tls(tls, sources["tls"]),
            explorers=tls_explorers,
            client=client,
            client_side=client_side,
            join_token=join_token,
            ca_pin=ca_pin,
            stop=stop,
        )

    node = NodeService(
        identity, vms, client, rpc, listeners, advertiser, heartbeats, node_tls
    )
    listeners.setName("listeners")
    listeners.setServiceParent(node)
    if service.IService.providedBy(vms):
        vms.setName("vms")
        vms.setServiceParent(node)
    if images is None:
        images = Images(reactor, default_image_dirs(state_dir))
    images.setName("images")
    images.setServiceParent(node)
    images.register(rpc)
    for loop in heartbeats:
        loop.setName(f"heartbeat {loop.address.uri}")
        # TLS heartbeats wait for the TLS material: NodeTLS starts them.
        loop.setServiceParent(node_tls if loop.address.scheme == "tls" else node)
    if node_tls is not None:
        node_tls.setName("tls")
        node_tls.setServiceParent(node)
    if metrics is not None:
        make_metrics(
            listen=metrics, node=node, factory=factory, clock=clock, reactor=reactor
        ).setServiceParent(node)
    NodeMethods(node).register(rpc)
    return node
