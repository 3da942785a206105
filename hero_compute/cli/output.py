"""
Where results go: a :mod:`rich` table for a person at a terminal, JSON for everything
else (a pipe, a file, ``--json``), so scripts see what they always saw.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.status import Status


#: Widest row printed before rich would squeeze columns.
WIDE = 250


class Output:
    """
    The command's stdout and stderr, and how to write to them.

    :param out: the file for results
    :param err: the file for messages and progress
    :param json_only: ``--json`` was given
    :param table: ``--table`` was given: a table even when ``out`` is not a terminal
    """

    def __init__(
        self, out: TextIO, err: TextIO, json_only: bool = False, table: bool = False
    ) -> None:
        self.out = out
        self.err = err
        # Rows at their natural width, as kubectl prints them: a narrow terminal wraps
        # them, but no id is ever cut or folded into pieces.
        self._console = Console(file=out, highlight=False, width=WIDE)
        self._errors = Console(file=err, highlight=False)
        self.tables = not json_only and (table or self._console.is_terminal)

    def json(self, data: Any) -> None:
        """Write ``data`` as indented JSON, keys sorted."""
        self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        self.out.flush()

    def emit(
        self, data: Any, render: Callable[[Any], RenderableType] | None = None
    ) -> None:
        """
        Write a result: ``render(data)`` (a rich renderable) on a terminal, JSON otherwise.

        :param render: None to always write JSON (raw ``call`` and ``rpc``)
        """
        if render is not None and self.tables:
            self._console.print(render(data))
            self.out.flush()
        else:
            self.json(data)

    def error(self, message: object) -> None:
        """Write a message to stderr, verbatim (no markup)."""
        self.err.write(f"hero-compute: {message}\n")
        self.err.flush()

    @contextlib.contextmanager
    def progress(self, text: str) -> Iterator[Progress]:
        """
        A live status line on stderr while a long call runs, only when stderr is a
        terminal: ``text``, then what :meth:`Progress.update` says, and the seconds spent.

        :return: a context manager giving the :class:`Progress`
        """
        if not self._errors.is_terminal:
            yield Progress(text, None)
            return
        with self._errors.status(Text(text)) as status:
            yield Progress(text, status)


class Progress:
    """
    The status line of :meth:`Output.progress`.

    :ivar live: whether anyone sees it (polling for it is otherwise wasted)
    """

    def __init__(self, text: str, status: Status | None) -> None:
        self._text = text
        self._status = status
        self._started = time.monotonic()
        self.live = status is not None

    def update(self, news: str) -> None:
        """Show ``news`` (e.g. the VM's state) after the text."""
        if self._status is not None:
            elapsed = time.monotonic() - self._started
            self._status.update(Text(f"{self._text}{news} ({elapsed:.0f} s)"))


def table(
    columns: Iterable[str], rows: Iterable[Sequence[Any]], title: str | None = None
) -> Table:
    """
    A plain table: header row, no borders, like ``kubectl get`` and ``nomad status``.

    :param columns: the column headers
    :param rows: sequences of cells (strings or rich text)
    """
    t = Table(
        box=box.SIMPLE_HEAD,
        title=title,
        pad_edge=False,
        header_style="bold",
        show_edge=False,
    )
    for column in columns:
        t.add_column(column, no_wrap=True)
    for row in rows:
        t.add_row(*map(_cell, row))
    return t


def fields(pairs: Iterable[tuple[str, Any]]) -> Table:
    """
    A two-column key/value table for one record (``node ID``, ``vm show``, ``info``).

    :param pairs: ``(name, value)`` in display order
    """
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for name, value in pairs:
        t.add_row(name, _cell(value))
    return t


def _cell(value: Any) -> Text:
    # Names and labels come from nodes: never let them be read as rich markup.
    return value if isinstance(value, Text) else Text("" if value is None else str(value))


def styled_state(state: Any) -> Text:
    """:return: a node status or VM state as rich text, green when healthy"""
    colour = {
        "online": "green",
        "running": "green",
        "offline": "red",
        "error": "red",
        "stopped": "dim",
    }.get(state, "yellow")
    return Text(str(state), style=colour)
