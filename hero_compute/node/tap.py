"""
``twistd node``: options and the service tree.

Every option may also come from the environment (CONTRACT §2); the command line wins.
"""

import os
import socket

from twisted.python import usage

from hero_compute.rpc.addresses import MAX_UNIX_PATH, AddressError, parse_address
from hero_compute.options import (
    absolute_socket,
    from_env,
    help_text,
    listen_address,
    seconds,
    socket_dir,
)


def _advertise(text):
    address = parse_address(text)
    if address.scheme != "tcp":
        raise ValueError(f"{text!r}: the advertise address must be tcp://host:port")
    return address


setattr(_advertise, "coerceDoc", "tcp://host:port or tcp://[v6addr]:port.")  # noqa: B010


class Options(usage.Options):
    """Options of ``twistd node``."""

    synopsis = ("[--socket PATH] [--tcp HOST:PORT] [--advertise URI] [--explorer URI]... "
                "[--interval S] [--node-id ID] [--state-dir DIR]")
    longdesc = (
        "A hero_compute node: serves the VMs of this machine and heartbeats explorers. "
        "Environment: HERO_SOCKET_DIR, NODE_SOCKET, NODE_TCP_ADDR, NODE_ADVERTISE_ADDR, "
        "EXPLORER_ADDRESSES, HEARTBEAT_INTERVAL, NODE_ID, NODE_NAME, HERO_STATE_DIR, "
        "NODE_IMAGE_DIRS."
    )
    optParameters = [
        ["socket", None, None,
         "Unix socket [default: $NODE_SOCKET or $HERO_SOCKET_DIR/hero_compute_server.sock]",
         absolute_socket],
        ["tcp", None, None,
         "Also listen on TCP here, so remote explorers can reach this node "
         "[default: $NODE_TCP_ADDR; unset: no TCP]", listen_address],
        ["advertise", None, None,
         "Address reported to TCP explorers [default: $NODE_ADVERTISE_ADDR, else the local "
         "address on its connection to each explorer, with the --tcp port]", _advertise],
        ["interval", None, None,
         "Seconds between heartbeats [default: $HEARTBEAT_INTERVAL or 10]", seconds],
        ["node-id", None, None, "Node id [default: $NODE_ID, else generated once and "
         "kept in the state dir]."],
        ["name", None, None, "Human name [default: $NODE_NAME or the host name]."],
        ["state-dir", None, None,
         "State directory [default: $HERO_STATE_DIR or ~/hero/var/hero_compute]."],
    ]

    def __init__(self, env=None):
        usage.Options.__init__(self)
        self["explorer"] = []
        self["image-dir"] = []
        self._env = os.environ if env is None else env

    @help_text
    def opt_image_dir(self, path):
        """
        Only base images under this directory may back a VM's disk; may repeat
        [default: $NODE_IMAGE_DIRS, colon-separated; unset: any file the node can read].
        """
        if not os.path.isabs(path):
            raise usage.UsageError(f"--image-dir {path!r}: must be an absolute path")
        self["image-dir"].append(path)

    @help_text
    def opt_explorer(self, uri):
        """
        An explorer to heartbeat (unix:///path, /path, tcp://host:port); may repeat
        [default: $EXPLORER_ADDRESSES, comma-separated, or the local explorer socket].
        """
        try:
            self["explorer"].append(parse_address(uri))
        except AddressError as e:
            raise usage.UsageError(f"--explorer: {e}") from None

    def postOptions(self):
        env = self._env
        from_env(self, "socket", env, "NODE_SOCKET", absolute_socket)
        if self["socket"] is None:
            self["socket"] = os.path.join(socket_dir(env), "hero_compute_server.sock")
        from_env(self, "tcp", env, "NODE_TCP_ADDR", listen_address)
        from_env(self, "advertise", env, "NODE_ADVERTISE_ADDR", _advertise)
        from_env(self, "interval", env, "HEARTBEAT_INTERVAL", seconds)
        if self["interval"] is None:
            self["interval"] = 10.0
        self["node-id"] = self["node-id"] or env.get("NODE_ID") or None
        self["name"] = self["name"] or env.get("NODE_NAME") or socket.gethostname()
        self["state-dir"] = (self["state-dir"] or env.get("HERO_STATE_DIR")
                             or os.path.expanduser("~/hero/var/hero_compute"))
        state_dir = os.path.abspath(self["state-dir"])
        self["state-dir"] = state_dir
        longest = os.path.join(state_dir, "vms", "0" * 32, "qmp.sock")
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            raise usage.UsageError(
                f"state directory {state_dir!r} is too long: the QMP sockets of VMs under "
                f"it would exceed the {MAX_UNIX_PATH}-byte Unix socket path limit; "
                "set a shorter HERO_STATE_DIR or --state-dir")
        if not self["image-dir"] and env.get("NODE_IMAGE_DIRS"):
            for path in env["NODE_IMAGE_DIRS"].split(":"):
                if not os.path.isabs(path):
                    raise usage.UsageError(
                        f"NODE_IMAGE_DIRS={env['NODE_IMAGE_DIRS']!r}: {path!r} is not an "
                        "absolute path")
                self["image-dir"].append(path)
        if not self["explorer"]:
            self["explorer"] = self._explorers_from_env(env)
        elif len(set(self["explorer"])) != len(self["explorer"]):
            raise usage.UsageError("--explorer: an explorer is listed twice")
        remote = [a.uri for a in self["explorer"] if not a.is_unix]
        if remote and self["tcp"] is None:
            raise usage.UsageError(
                f"explorer(s) {', '.join(remote)} are reached over TCP, but this node has "
                "no TCP listener, so they could never reach it back: set NODE_TCP_ADDR "
                "(or --tcp), e.g. 0.0.0.0:9003, and NODE_ADVERTISE_ADDR (or --advertise) "
                "if the explorer must use another address than this host's own"
            )

    def _explorers_from_env(self, env):
        text = env.get("EXPLORER_ADDRESSES")
        if not text:
            return [parse_address(os.path.join(socket_dir(env), "hero_compute_explorer.sock"))]
        addresses = []
        for item in text.split(","):
            item = item.strip()
            try:
                addresses.append(parse_address(item))
            except AddressError as e:
                raise usage.UsageError(f"EXPLORER_ADDRESSES={text!r}: {e}") from None
        if len(set(addresses)) != len(addresses):
            raise usage.UsageError(f"EXPLORER_ADDRESSES={text!r}: an explorer is listed twice")
        return addresses


def makeService(options, reactor=None):
    """
    Wire the node from its options; nothing is opened until it starts.

    :param options: parsed :class:`Options`
    :param reactor: the reactor (and clock), the global one by default
    :return: the root service, built by :func:`~hero_compute.node.service.make_node`
    """
    if reactor is None:
        from twisted.internet import reactor

    from .service import make_node
    from .backends import make_vm_manager

    return make_node(
        reactor=reactor,
        clock=reactor,
        socket_path=options["socket"],
        tcp=options["tcp"],
        listen=[],
        explorers=options["explorer"],
        vms=make_vm_manager(reactor, options["state-dir"], options["image-dir"] or None),
        state_dir=options["state-dir"],
        interval=options["interval"],
        node_id=options["node-id"],
        name=options["name"],
        advertise=options["advertise"],
    )
