"""
The schemas and the served methods never drift apart.
"""

import pytest

from hero_compute.explorer import tap as explorer_tap
from hero_compute.node import tap as node_tap
from hero_compute.rpc.schema import load_schema


def served(service):
    """The method names a built service publishes."""
    return service.rpc.method_names()


@pytest.mark.parametrize(
    "name, build",
    [
        (
            "explorer",
            lambda tmp: explorer_tap.makeService(
                _parsed(explorer_tap.Options(env={"HERO_SOCKET_DIR": tmp}))
            ),
        ),
        (
            "node",
            lambda tmp: node_tap.makeService(
                _parsed(
                    node_tap.Options(env={"HERO_SOCKET_DIR": tmp, "HERO_STATE_DIR": tmp})
                )
            ),
        ),
    ],
)
def test_schema_matches_served_methods(name, build, short_tmp):
    """Every served method is in the schema, and every schema method is served."""
    schema = set(load_schema(name).methods)
    methods = served(build(short_tmp))
    assert methods - {"rpc.discover"} == schema
    assert "rpc.discover" in methods


def test_params_match_handler_signatures(short_tmp):
    """Each schema method's params are exactly the keyword params of its handler."""

    for name, build in (
        (
            "explorer",
            lambda: explorer_tap.makeService(
                _parsed(explorer_tap.Options(env={"HERO_SOCKET_DIR": short_tmp}))
            ),
        ),
        (
            "node",
            lambda: node_tap.makeService(
                _parsed(
                    node_tap.Options(
                        env={"HERO_SOCKET_DIR": short_tmp, "HERO_STATE_DIR": short_tmp}
                    )
                )
            ),
        ),
    ):
        service = build()
        for method in load_schema(name).methods.values():
            names = service.rpc.param_names(method.name)
            assert names == [p.name for p in method.params], method.name


def _parsed(options):
    options.parseOptions([])
    return options
