"""
The audit log (CONTRACT §10): every call that changes something, with its time, this
explorer, the caller, the method, the target and the outcome; never a token, secret,
key or ``user_data`` (only the target, a node or VM id, is taken from the params).

Methods are audited where they are published: :meth:`AuditLog.registrar` wraps the
dispatcher's ``register``, so a method named in :data:`TARGETS` is audited whoever
registers it (``explorer.place`` and ``explorer.create_vm`` included, once they exist).
Anything else that changes something (a console attach) calls :meth:`AuditLog.record`.

Entries are kept in memory and written in batches, like node records: the answer to a
call never waits on the store, and entries the store could not take are kept for the
next write.  ``explorer.audit`` reads the store and adds the entries not yet written.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hero_compute.rpc.errors import RpcError, StoreUnavailable

from .credentials import csr_node_id
from .store import AUDIT_FIELDS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from hero_compute.rpc.context import CallContext
    from hero_compute.rpc.dispatch import Dispatcher
    from hero_compute.rpc.websocket_server import Route

    from .store import IStore


log = Logger()

#: Seconds entries wait to be written together.
FLUSH_EVERY = 1.0

#: ``explorer.audit``'s default and largest ``limit``.
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000

#: Proxied node methods that change nothing, so are not audited.
READS = frozenset({"vm.get", "vm.list", "vm.console_log"})

#: Proxied method families that change something on the node (``image.import``
#: downloads into it); ``node.*`` only reads.
AUDITED_PREFIXES = ("vm.", "image.")

#: Characters kept of a proxied method's name and target.
MAX_FIELD = 200


def _param(name):
    return lambda context, params: params.get(name) or ""


def _enrolling(context, params):
    try:
        return csr_node_id(params.get("csr") or "")
    except RpcError:
        return "?"


def _renewing(context, params):
    identity = context.identity
    return identity.name if identity is not None else "?"


def _proxied(context, params):
    method = params.get("method")
    if (
        not isinstance(method, str)
        or not method.startswith(AUDITED_PREFIXES)
        or method in READS
    ):
        return None
    node_id, inner = params.get("node_id") or "", params.get("params")
    vm_id = inner.get("vm_id") if isinstance(inner, dict) else None
    # Both come from the caller unchecked (the node checks them): an entry is kept
    # small whatever was sent, or one request could write a megabyte of audit log.
    target = f"{node_id}/{vm_id}" if isinstance(vm_id, str) else node_id
    return _clip(method), _clip(target)


def _clip(text):
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 1] + "…"


#: The audited methods and how to name each call's target from its context and its
#: (named) params; None means "not audited" (a proxied read), and a pair names the
#: method recorded too (the proxied ``vm.*`` one).
TARGETS = {
    "explorer.create_token": _param("node_id"),
    "explorer.enroll": _enrolling,
    "explorer.renew": _renewing,
    "explorer.revoke": _param("node_id"),
    "explorer.remove_node": _param("node_id"),
    "explorer.place": _param("node_id"),
    "explorer.create_vm": _param("name"),
    # Dashboard accounts (CONTRACT §11): the target is the user, never the token.
    "explorer.ui_token_create": _param("user"),
    "explorer.ui_token_revoke": _param("user"),
    "explorer.call": _proxied,
}


def caller_of(context: CallContext) -> str:
    """
    :param context: a :class:`~hero_compute.rpc.dispatch.CallContext`
    :return: who called, as the audit log names them: ``unix:<uid>``, the certificate's
        SPIFFE id, or ``<transport>:<address>``
    """
    if context.transport == "unix":
        return "unix:?" if context.uid is None else f"unix:{context.uid}"
    if context.identity is not None:
        return context.identity.uri
    return f"{context.transport}:{context.peer}"


def _refusal(error):
    status = getattr(error, "status", None)
    return f"refused {status}" if status is not None else _outcome(error)


def _outcome(result: object) -> str:
    if not isinstance(result, BaseException):
        return "ok"
    code = result.code if isinstance(result, RpcError) else -32603
    return f"error {code}"


class AuditLog:
    """
    :param clock: ``IReactorTime`` (Unix seconds)
    :param explorer: this explorer's name in the entries
    :param store: ``store()`` -> the open :class:`~hero_compute.explorer.store.IStore`,
        or None
    :param run: ``run(f, *args)``: call ``f`` where store calls run (at once, or on
        the store's thread, returning a Deferred)
    """

    def __init__(
        self,
        clock: IReactorTime,
        explorer: str,
        store: Callable[[], IStore | None],
        run: Callable[..., Any],
    ) -> None:
        self._clock = clock
        self.explorer = explorer
        self._store = store
        self._run = run
        self._pending: list[dict[str, Any]] = []
        self._flusher: IDelayedCall | None = None

    def record(self, caller: str, method: str, target: str | None, outcome: str) -> None:
        """Add one entry, written with the others of the same second."""
        self._pending.append(
            {
                "time": self._clock.seconds(),
                "explorer": self.explorer,
                "caller": caller,
                "method": method,
                "target": target,
                "outcome": outcome,
            }
        )
        if self._flusher is None:
            self._flusher = self._clock.callLater(FLUSH_EVERY, self.flush)

    def flush(self) -> defer.Deferred[Any] | None:
        """Write the entries kept so far; those the store cannot take are kept."""
        self._flusher = None
        store = self._store()
        if not self._pending or store is None:
            return None
        batch, self._pending = self._pending, []
        d = defer.maybeDeferred(self._run, store.add_audit, batch)

        def failed(failure) -> None:
            self._pending[:0] = batch
            if not failure.check(StoreUnavailable):
                log.failure("audit entries not written", failure)
            if self._flusher is None:
                self._flusher = self._clock.callLater(FLUSH_EVERY, self.flush)

        return d.addErrback(failed)

    def stop(self) -> None:
        """Write what is left (at shutdown), at once."""
        if self._flusher is not None and self._flusher.active():
            self._flusher.cancel()
        self._flusher = None
        store = self._store()
        if self._pending and store is not None:
            try:
                store.add_audit(self._pending)
                self._pending = []
            except StoreUnavailable:
                log.warn("state store down: {n} audit entries lost", n=len(self._pending))

    def query(
        self,
        since: float | None = None,
        limit: int = DEFAULT_LIMIT,
        node_id: str | None = None,
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """
        ``explorer.audit``: entries newest first, those not yet written included.

        :return: ``{"entries": [...]}`` (or a Deferred of it)
        """
        limit = max(1, min(int(limit), MAX_LIMIT))
        store = self._store()
        if store is None:
            raise StoreUnavailable()
        since = since or 0

        def mine(entry):
            target = entry["target"]
            return entry["time"] >= since and (
                node_id is None or target == node_id or target.startswith(node_id + "/")
            )

        pending = [dict(e) for e in reversed(self._pending) if mine(e)][:limit]
        d = defer.maybeDeferred(self._run, store.audit, since, limit, node_id)
        return d.addCallback(lambda stored: {"entries": (pending + stored)[:limit]})

    def wrap(
        self,
        method: str,
        func: Callable[..., Any],
        target: Callable[[CallContext, Any], str | None],
        takes_context: bool = False,
    ) -> Callable[..., Any]:
        """
        :param method: the method's name
        :param func: its handler
        :param target: ``target(context, params) -> str or None`` (None: not audited)
        :param takes_context: whether ``func`` takes the call context first
        :return: a handler taking the context first, recording each call's outcome
        """
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if takes_context:
            params = params[1:]
        bare = signature.replace(parameters=params)
        named_by = arguments_by_name(bare)

        @functools.wraps(func)
        def audited(context, *args, **kwargs):
            try:
                named = named_by(args, kwargs)
                aim = target(context, named)
            except (TypeError, ValueError):
                aim = "?"
            call = (context, *args) if takes_context else args
            if aim is None:
                return func(*call, **kwargs)
            name = method
            if isinstance(aim, tuple):
                name, aim = aim
            caller = caller_of(context)
            try:
                result = func(*call, **kwargs)
            except Exception as e:
                self.record(caller, name, aim, _outcome(e))
                raise
            if inspect.iscoroutine(result):
                # An async handler (explorer.create_vm): its outcome is known only
                # once it has run, not when it is called.
                result = defer.ensureDeferred(result)
            if isinstance(result, defer.Deferred):

                def settled(outcome):
                    value = outcome.value if isinstance(outcome, Failure) else outcome
                    self.record(caller, name, aim, _outcome(value))
                    return outcome

                return result.addBoth(settled)
            self.record(caller, name, aim, "ok")
            return result

        context = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        audited.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[context, *params]
        )
        return audited

    def route(self, route: Route, method: str, target: Callable[[Any], str]) -> Route:
        """
        :param route: a WebSocket :class:`~hero_compute.rpc.websocket_server.Route`
        :param method: the name its openings are recorded under (``console.attach``)
        :param target: ``target(params) -> str`` from the route's params
        :return: the route, each opening recorded with its outcome
        """
        accept = route.accept

        def audited(request):
            caller, aim = caller_of(request.context), target(request.params)
            try:
                verdict = accept(request)
            except Exception as e:
                self.record(caller, method, aim, _refusal(e))
                raise
            d = defer.maybeDeferred(lambda: verdict)

            def settled(outcome):
                failed = isinstance(outcome, Failure)
                self.record(
                    caller, method, aim, _refusal(outcome.value) if failed else "ok"
                )
                return outcome

            return d.addBoth(settled)

        return attrs.evolve(route, accept=audited)

    def registrar(self, rpc: Dispatcher) -> _Registrar:
        """
        :param rpc: a :class:`~hero_compute.rpc.dispatch.Dispatcher`
        :return: an object whose ``register`` is the dispatcher's, auditing the methods
            of :data:`TARGETS`
        """
        return _Registrar(rpc, self)


class _Registrar:
    def __init__(self, rpc: Dispatcher, audit: AuditLog) -> None:
        self._rpc = rpc
        self._audit = audit

    def register(self, name: str, func: Callable[..., Any], context: bool = False) -> None:
        target = TARGETS.get(name)
        if target is None:
            return self._rpc.register(name, func, context=context)
        wrapped = self._audit.wrap(name, func, target, takes_context=context)
        return self._rpc.register(name, wrapped, context=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)


__all__ = ["AUDIT_FIELDS", "TARGETS", "AuditLog", "caller_of"]


def arguments_by_name(
    signature: inspect.Signature,
) -> Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]]:
    """
    :param signature: a handler's signature (without its context)
    :return: ``named(args, kwargs)``: a call's arguments by name, as
        ``signature.bind(*args, **kwargs).arguments``; the dispatcher passes a schema's
        checked params by name, which need no binding (binding was a tenth of the
        explorer's Python time per proxied call)
    :raise TypeError: as ``bind`` does, when they do not fit
    """
    names = frozenset(signature.parameters)
    required = frozenset(
        name
        for name, p in signature.parameters.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    simple = all(
        p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in signature.parameters.values()
    )

    def named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if simple and not args and required <= kwargs.keys() <= names:
            return kwargs
        return signature.bind(*args, **kwargs).arguments

    return named
