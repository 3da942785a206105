"""
``twistd node``'s options for TLS and enrollment (CONTRACT §6): the node's certificate,
key and fleet CA, and the join token and CA pin that enroll it when it has none.  Part
of the tap: each option also comes from its variable, the command line winning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from twisted.python import usage

from hero_compute.options import from_env, listen_address


def _pin(text):
    pin = text.strip().lower()
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", pin):
        raise ValueError(
            f"{text!r} is not a CA pin: expected sha256:<64 hex digits>, as "
            "printed by hero-compute tls ca create or hero-compute tls pin"
        )
    return pin


setattr(_pin, "coerceDoc", "sha256:<64 hex>, as printed by hero-compute tls pin CA.pem.")  # noqa: B010


def _absolute(text):
    return os.path.abspath(os.path.expanduser(text))


OPT_PARAMETERS = [
    [
        "tls-cert",
        None,
        None,
        "Node certificate [default: $NODE_TLS_CERT or STATE_DIR/tls/node.pem]",
        _absolute,
    ],
    [
        "tls-key",
        None,
        None,
        "Its private key [default: $NODE_TLS_KEY or STATE_DIR/tls/node-key.pem]",
        _absolute,
    ],
    [
        "tls-ca",
        None,
        None,
        "Fleet CA certificate [default: $NODE_TLS_CA or STATE_DIR/tls/ca.pem]",
        _absolute,
    ],
    [
        "join-token",
        None,
        None,
        "Join token to enroll with a tls:// explorer when there is no certificate yet; "
        "prefer $NODE_JOIN_TOKEN, which other users cannot see in ps",
    ],
    [
        "ca-pin",
        None,
        None,
        "Pin of the fleet CA (sha256:<64 hex>) trusted for enrollment "
        "[default: $NODE_CA_PIN]",
        _pin,
    ],
]


def post_options(options: usage.Options, env: Mapping[str, str]) -> None:
    """
    Fill the TLS options from the environment and defaults, and check that a node
    serving TLS has a certificate or the means to enroll for one
    (``options["tls-files"]``).

    :param options: the node's :class:`~twisted.python.usage.Options`
    :param env: the environment mapping
    :raise usage.UsageError: naming what to set
    """
    from_env(options, "tls", env, "NODE_TLS_ADDR", listen_address)
    for key, name in (
        ("tls-cert", "NODE_TLS_CERT"),
        ("tls-key", "NODE_TLS_KEY"),
        ("tls-ca", "NODE_TLS_CA"),
    ):
        from_env(options, key, env, name, _absolute)
    options["join-token"] = options["join-token"] or env.get("NODE_JOIN_TOKEN") or None
    from_env(options, "ca-pin", env, "NODE_CA_PIN", _pin)
    from .enroll import TLSFiles

    files = TLSFiles.in_state_dir(
        options["state-dir"], options["tls-cert"], options["tls-key"], options["tls-ca"]
    )
    options["tls-files"] = files
    secure = [a.uri for a in options["explorer"] if a.scheme == "tls"]
    if secure and options["tls"] is None:
        raise usage.UsageError(
            f"explorer(s) {', '.join(secure)} are reached over TLS, but this node has "
            "no TLS listener, so they could never reach it back: set NODE_TLS_ADDR "
            "(or --tls), e.g. 0.0.0.0:9004, and NODE_ADVERTISE_ADDR (or --advertise) "
            "if the explorer must use another address than this host's own"
        )
    if options["tls"] is None or files.exists():
        return
    # Checked here, not when the node starts: an operator sees it at once, and a
    # service manager does not restart a node that can never come up.
    if not (options["join-token"] and options["ca-pin"] and secure):
        raise usage.UsageError(
            f"no TLS certificate at {files.cert} (or its key or {files.ca}): set "
            "NODE_JOIN_TOKEN and NODE_CA_PIN (or --join-token and --ca-pin) to enroll "
            "with a tls:// explorer, or make one with hero-compute tls cert create "
            "--node NODE_ID and point NODE_TLS_CERT, NODE_TLS_KEY, NODE_TLS_CA at it"
        )
