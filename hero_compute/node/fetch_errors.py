"""
The errors of a download (kept apart so that :mod:`~hero_compute.node.sink` and
:mod:`~hero_compute.node.fetch` share them without importing each other).
"""


class FetchError(Exception):
    """
    A download that failed; its text is the reason ``node.images`` shows.

    :param reason: what happened, for an operator
    """

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, reason)
        self.reason = reason


class RefusedTarget(FetchError):
    """A host whose address the policy refuses, or that resolves to nothing."""
