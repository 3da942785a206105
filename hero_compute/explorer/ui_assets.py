"""
The third-party files the dashboard serves with its page: xterm.js (the terminal of the
console view) and its fit add-on, copied byte for byte from their npm packages at the
pinned versions below (``make xterm`` refreshes them), each with its licence.

They ship as package data beside the page and are served from the dashboard's own
origin: no CDN, no build step, nothing fetched at run time.
"""

#: The npm packages copied into ``ui/static``, pinned: ``{package: version}``.
PINNED = {"@xterm/xterm": "6.0.0", "@xterm/addon-fit": "0.11.0"}

_JS = b"text/javascript; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"

#: ``{file name in ui/static: content type}`` of the vendored files.
VENDORED = {
    "xterm.js": _JS,
    "xterm.css": b"text/css; charset=utf-8",
    "xterm-addon-fit.js": _JS,
    "xterm-LICENSE.txt": _TEXT,
    "xterm-addon-fit-LICENSE.txt": _TEXT,
}
