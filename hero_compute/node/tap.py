"""
``twistd node``: options and the service tree.

Every option may also come from the environment (CONTRACT §2); the command line wins.
The TLS and enrollment options are :mod:`.tap_tls`'s, the image ones
:mod:`.tap_images`'s, the VM ones :mod:`.tap_vms`'s.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.python import usage

from hero_compute.options import (
    TapOptions,
    absolute_socket,
    from_env,
    help_text,
    limit_help,
    limits,
    listen_address,
    parse_capacity,
    parse_labels,
    print_startup_errors,
    seconds,
    socket_dir,
    source_of,
)
from hero_compute.rpc.addresses import MAX_UNIX_PATH, AddressError, parse_address
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.systemd import notifier_for
from hero_compute.rpc.twisted_private import lean_poll

from . import tap_images, tap_tls, tap_vms

if TYPE_CHECKING:
    from .service import NodeService


def _advertise(text):
    address = parse_address(text)
    if address.scheme not in ("tcp", "tls"):
        raise ValueError(
            f"{text!r}: the advertise address must be tcp://host:port or tls://host:port"
        )
    return address


setattr(_advertise, "coerceDoc", "tcp://host:port, tls://host:port, or with [v6addr].")  # noqa: B010


def _positive(text):
    """:return: ``text`` as an integer of at least 1"""
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


_positive.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


class Options(TapOptions):
    """Options of ``twistd node``."""

    command = "node"

    synopsis = (
        "[--socket PATH] [--tcp HOST:PORT] [--tls HOST:PORT] [--advertise URI] "
        "[--explorer URI]... [--interval S] [--node-id ID] [--state-dir DIR] "
        "[--tls-cert PEM --tls-key PEM --tls-ca PEM] [--join-token T --ca-pin PIN] "
        "[--metrics HOST:PORT]"
    )
    longdesc = (
        "A hero_compute node: serves the VMs of this machine and heartbeats explorers. "
        "Environment: HERO_SOCKET_DIR, NODE_SOCKET, NODE_TCP_ADDR, NODE_ADVERTISE_ADDR, "
        "EXPLORER_ADDRESSES, HEARTBEAT_INTERVAL, NODE_ID, NODE_NAME, HERO_STATE_DIR, "
        "NODE_IMAGE_DIRS, NODE_TLS_ADDR, NODE_TLS_CERT, NODE_TLS_KEY, NODE_TLS_CA, "
        "NODE_JOIN_TOKEN, NODE_CA_PIN, NODE_METRICS_ADDR, NODE_ACCEL, NODE_VM_BRIDGES, "
        "NODE_VM_PORTS, NODE_VM_FORWARD_ADDR, NODE_IMAGE_MAX, NODE_IMAGE_FETCH_LOCAL, "
        "NODE_CONSOLE_LOG, NODE_MAX_CONSOLES. SIGHUP re-reads the TLS "
        "certificate files. Run two twistd in one directory with --pidfile= (or "
        "distinct --pidfile), or they clash on twistd.pid."
    )
    optParameters = [
        [
            "socket",
            None,
            None,
            "Unix socket "
            "[default: $NODE_SOCKET or $HERO_SOCKET_DIR/hero_compute_server.sock]",
            absolute_socket,
        ],
        [
            "tcp",
            None,
            None,
            "Also listen on TCP here, so remote explorers can reach this node "
            "[default: $NODE_TCP_ADDR; unset: no TCP]",
            listen_address,
        ],
        [
            "tls",
            None,
            None,
            "Also serve mutual TLS here, for tls:// explorers and clients with fleet "
            "certificates [default: $NODE_TLS_ADDR; unset: no TLS]",
            listen_address,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (GET /metrics) here "
            "[default: $NODE_METRICS_ADDR; unset: no metrics]",
            listen_address,
        ],
        [
            "advertise",
            None,
            None,
            "Address (its host, or all of it for explorers of its scheme) reported to TCP "
            "and TLS explorers [default: $NODE_ADVERTISE_ADDR, else the local address on "
            "its connection to each explorer, with the --tcp or --tls port]",
            _advertise,
        ],
        *tap_tls.OPT_PARAMETERS,
        [
            "interval",
            None,
            None,
            "Seconds between heartbeats [default: $HEARTBEAT_INTERVAL or 10]",
            seconds,
        ],
        [
            "node-id",
            None,
            None,
            "Node id [default: $NODE_ID, else generated once and kept in the state dir].",
        ],
        ["name", None, None, "Human name [default: $NODE_NAME or the host name]."],
        [
            "labels",
            None,
            None,
            "Labels sent in every heartbeat, key=value,key=value, for placement "
            "[default: $NODE_LABELS; unset: none]",
            parse_labels,
        ],
        [
            "capacity",
            None,
            None,
            "What this node's VMs may reserve in all, vcpus=N,memory=SIZE,disk=SIZE, any "
            "subset [default: $NODE_CAPACITY; unset: the host's]",
            parse_capacity,
        ],
        [
            "console-log",
            None,
            None,
            "Bytes of each VM's serial console kept [default: $NODE_CONSOLE_LOG or "
            "1048576]",
            _positive,
        ],
        [
            "max-consoles",
            None,
            None,
            "Console viewers at once per VM [default: $NODE_MAX_CONSOLES or 8]",
            _positive,
        ],
        [
            "state-dir",
            None,
            None,
            "State directory [default: $HERO_STATE_DIR or ~/hero/var/hero_compute].",
        ],
        *tap_vms.OPT_PARAMETERS,
    ]

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        TapOptions.__init__(self)
        self["explorer"] = []
        self["image-dir"] = []
        self["limit"] = []
        self._env = os.environ if env is None else env

    @help_text
    def opt_image_dir(self, path: str) -> None:
        """
        Only base images under this directory may back a VM's disk; may repeat
        [default: $NODE_IMAGE_DIRS, colon-separated; unset: $HERO_STATE_DIR/images].
        """
        if not os.path.isabs(path):
            raise usage.UsageError(f"--image-dir {path!r}: must be an absolute path")
        self["image-dir"].append(path)

    @help_text
    def opt_image_max(self, text: str) -> None:
        """Largest image image.import may bring, e.g. 20G [default: $NODE_IMAGE_MAX]."""
        self["image-max"] = text

    @help_text
    def opt_image_fetch_local(self) -> None:
        """image.import may fetch from loopback and link-local addresses."""
        self["image-fetch-local"] = "1"

    @help_text
    def opt_explorer(self, uri: str) -> None:
        """
        An explorer to heartbeat (unix:///path, /path, tcp://host:port); may repeat
        [default: $EXPLORER_ADDRESSES, comma-separated, or the local explorer socket].
        """
        try:
            self["explorer"].append(parse_address(uri))
        except AddressError as e:
            raise usage.UsageError(f"--explorer: {e}") from None

    @limit_help("HERO_")
    def opt_limit(self, item: str) -> None:
        """
        Set one limit of hostile load, NAME=VALUE (e.g. max_batch=50, or
        HERO_MAX_BATCH=50); may repeat [default: the HERO_* variables, else
        {defaults}].
        """
        self["limit"].append(item)

    def postOptions(self) -> None:
        env = self._env
        self["limits"] = limits(self, env)
        sources = self["sources"] = {
            "socket": source_of(self, "socket", env, "NODE_SOCKET"),
            "tcp": source_of(self, "tcp", env, "NODE_TCP_ADDR"),
            "tls": source_of(self, "tls", env, "NODE_TLS_ADDR"),
            "metrics": source_of(self, "metrics", env, "NODE_METRICS_ADDR"),
            "state-dir": source_of(self, "state-dir", env, "HERO_STATE_DIR"),
        }
        self["notify-env"] = {
            k: env[k]
            for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
            if k in env
        }
        from_env(self, "socket", env, "NODE_SOCKET", absolute_socket)
        if self["socket"] is None:
            sources["socket"] = "HERO_SOCKET_DIR"
            self["socket"] = os.path.join(socket_dir(env), "hero_compute_server.sock")
        from_env(self, "tcp", env, "NODE_TCP_ADDR", listen_address)
        from_env(self, "metrics", env, "NODE_METRICS_ADDR", listen_address)
        from_env(self, "advertise", env, "NODE_ADVERTISE_ADDR", _advertise)
        from_env(self, "interval", env, "HEARTBEAT_INTERVAL", seconds)
        if self["interval"] is None:
            self["interval"] = 10.0
        self["node-id"] = self["node-id"] or env.get("NODE_ID") or None
        from_env(self, "labels", env, "NODE_LABELS", parse_labels)
        from_env(self, "capacity", env, "NODE_CAPACITY", parse_capacity)
        from_env(self, "console-log", env, "NODE_CONSOLE_LOG", _positive)
        from_env(self, "max-consoles", env, "NODE_MAX_CONSOLES", _positive)
        self["name"] = self["name"] or env.get("NODE_NAME") or socket.gethostname()
        self["state-dir"] = (
            self["state-dir"]
            or env.get("HERO_STATE_DIR")
            or os.path.expanduser("~/hero/var/hero_compute")
        )
        state_dir = os.path.abspath(self["state-dir"])
        self["state-dir"] = state_dir
        longest = os.path.join(state_dir, "vms", "0" * 32, "qmp.sock")
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            raise usage.UsageError(
                f"state directory {state_dir!r} is too long: the QMP sockets of VMs under "
                f"it would exceed the {MAX_UNIX_PATH}-byte Unix socket path limit; "
                "set a shorter HERO_STATE_DIR or --state-dir"
            )
        tap_images.post_options(self, env)
        if not self["explorer"]:
            self["explorer"] = self._explorers_from_env(env)
        elif len(set(self["explorer"])) != len(self["explorer"]):
            raise usage.UsageError("--explorer: an explorer is listed twice")
        remote = [a.uri for a in self["explorer"] if a.scheme == "tcp"]
        if remote and self["tcp"] is None:
            raise usage.UsageError(
                f"explorer(s) {', '.join(remote)} are reached over TCP, but this node has "
                "no TCP listener, so they could never reach it back: set NODE_TCP_ADDR "
                "(or --tcp), e.g. 0.0.0.0:9003, and NODE_ADVERTISE_ADDR (or --advertise) "
                "if the explorer must use another address than this host's own"
            )
        tap_tls.post_options(self, env)
        tap_vms.post_options(self, env)
        if self.under_twistd:
            self._clean_startup_errors()

    def _clean_startup_errors(self) -> None:
        from hero_compute.rpc.listeners import StartupFailed
        from hero_compute.rpc.tls import TLSConfigError

        from .secret import SecretError

        print_startup_errors(
            "node",
            (StartupFailed, SecretError, TLSConfigError),
            [
                (os.path.dirname(self["socket"]), self["sources"]["socket"]),
                (self["state-dir"], self["sources"]["state-dir"]),
            ],
        )

    def _explorers_from_env(self, env):
        text = env.get("EXPLORER_ADDRESSES")
        if not text:
            return [
                parse_address(os.path.join(socket_dir(env), "hero_compute_explorer.sock"))
            ]
        addresses = []
        for item in text.split(","):
            item = item.strip()
            try:
                addresses.append(parse_address(item))
            except AddressError as e:
                raise usage.UsageError(f"EXPLORER_ADDRESSES={text!r}: {e}") from None
        if len(set(addresses)) != len(addresses):
            raise usage.UsageError(
                f"EXPLORER_ADDRESSES={text!r}: an explorer is listed twice"
            )
        return addresses


def makeService(options: Options, reactor: Any = None) -> NodeService:
    """
    Wire the node from its options; nothing is opened until it starts.

    :param options: parsed :class:`Options`
    :param reactor: the reactor (and clock), the global one by default
    :return: the root service, built by :func:`~hero_compute.node.service.make_node`
    """
    if reactor is None:
        from twisted.internet import reactor

    # Its own process: every read without the legacy log context around it.
    lean_poll(reactor)

    from .backends import make_vm_manager
    from .images import make_images
    from .qemu.console import DEFAULT_LOG, DEFAULT_MAX_CONSOLES, ConsoleSettings
    from .service import make_node

    node = make_node(
        reactor=reactor,
        clock=reactor,
        socket_path=options["socket"],
        tcp=options["tcp"],
        listen=[],
        explorers=options["explorer"],
        vms=make_vm_manager(
            reactor,
            options["state-dir"],
            options["image-dir"] or None,
            capacity=options["capacity"],
            accel=options["accel"],
            network=options["vm-network"],
            console=ConsoleSettings(
                options["console-log"] or DEFAULT_LOG,
                options["max-consoles"] or DEFAULT_MAX_CONSOLES,
            ),
        ),
        state_dir=options["state-dir"],
        interval=options["interval"],
        node_id=options["node-id"],
        name=options["name"],
        labels=options["labels"] or {},
        advertise=options["advertise"],
        tls=options["tls"],
        tls_files=options["tls-files"],
        join_token=options["join-token"],
        ca_pin=options["ca-pin"],
        # Enrollment refused (a wrong pin, a spent token): no retry can help.
        stop=reactor.stop,
        limits=options["limits"],
        metrics=None
        if options["metrics"] is None
        else Listen.tcp(options["metrics"], options["sources"]["metrics"]),
        images=make_images(
            reactor, options["image-dir"], options["state-dir"], options["images"]
        ),
        sources=options["sources"],
    )
    if options["notify-env"].get("NOTIFY_SOCKET"):
        # Only under a service manager (Type=notify), so the tree is otherwise the same.
        notifier_for(reactor, options["notify-env"], node.listeners).setServiceParent(node)
    return node
