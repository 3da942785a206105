"""
The ``.oschema`` format: parsing small inline schemas, params validation and coercion, the
shipped schemas, the generated OpenRPC document, and a fuzzed parser.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import validators

from hero_compute.rpc.errors import InvalidParams
from hero_compute.rpc.schema import SchemaError, load_schema, parse_schema

SMALL = """
[service]
title = "small"
description = "A small service."

[types.Point]
description = "A point."
fields.x = { type = "integer" }
fields.y = { type = "integer", optional = true }

[methods."geo.move"]
summary = "Move a point."
errors = [-32004]
params.point = { type = "Point" }
params.by = { type = "integer", minimum = 1 }
params.label = { type = "string", optional = true }
result = { type = "Point" }

[methods."geo.many"]
summary = "Many points."
params.points = { type = "array", items = "Point" }
params.tags = { type = "array", items = "string", optional = true }
result = { type = "array", items = "Point" }

[methods."geo.none"]
summary = "No params."
result = { type = "boolean" }
"""


@pytest.fixture
def small():
    """The small inline schema, parsed."""
    return parse_schema(SMALL, source="small.oschema")


def test_service_and_types(small):
    """The service's title, description and named types are read."""
    assert small.title == "small"
    assert small.description == "A small service."
    assert small.types["Point"]["properties"]["x"] == {"type": "integer"}
    assert small.types["Point"]["required"] == ["x"]
    assert small.types["Point"]["description"] == "A point."


def test_params_in_declaration_order(small):
    """Params keep declaration order, with required flags from optional = true."""
    move = small.methods["geo.move"]
    assert [(p.name, p.required) for p in move.params] == [
        ("point", True),
        ("by", True),
        ("label", False),
    ]
    assert move.errors == (-32004,)
    assert move.summary == "Move a point."


def test_type_names_become_refs(small):
    """A type name in a field spec becomes a $ref to components.schemas."""
    move = small.methods["geo.move"]
    assert move.params[0].schema == {"$ref": "#/components/schemas/Point"}
    assert move.result == {"$ref": "#/components/schemas/Point"}


def test_items_shorthand(small):
    """items = "T" is short for items = {type = "T"}, refs included."""
    many = small.methods["geo.many"]
    assert many.params[0].schema == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/Point"},
    }
    assert many.params[1].schema == {"type": "array", "items": {"type": "string"}}


def test_optional_is_not_json_schema(small):
    """The optional flag is ours: it does not leak into the JSON Schemas."""
    assert "optional" not in small.methods["geo.move"].params[2].schema
    assert "optional" not in small.types["Point"]["properties"]["y"]


def test_coerce_by_name(small):
    """Named params that match are returned as they are."""
    params = {"point": {"x": 1}, "by": 2}
    assert small.methods["geo.move"].coerce_params(params) == params


def test_coerce_by_position(small):
    """Positional params are mapped to names in declaration order."""
    assert small.methods["geo.move"].coerce_params([{"x": 1, "y": 2}, 3, "a"]) == {
        "point": {"x": 1, "y": 2},
        "by": 3,
        "label": "a",
    }


def test_coerce_none(small):
    """Absent params are no params, which a method without required params accepts."""
    assert small.methods["geo.none"].coerce_params(None) == {}
    with pytest.raises(InvalidParams):
        small.methods["geo.move"].coerce_params(None)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"point": {"x": "one"}, "by": 1}, "point.x"),
        ({"point": {"x": 1}, "by": 0}, "by"),
        ({"point": {"x": 1}, "by": 1, "label": 5}, "label"),
        ([{"x": 1}, "two"], "by"),
        ({"points": [{"x": 1}, {"y": 2}]}, "points.1.x"),
    ],
)
def test_invalid_params_name_the_field(small, params, field):
    """A param of the wrong type or range is -32602 whose message names the field."""
    name = "geo.many" if "points" in params else "geo.move"
    with pytest.raises(InvalidParams) as info:
        small.methods[name].coerce_params(params)
    assert info.value.code == -32602
    assert f"{field}:" in info.value.message
    assert info.value.data == {"field": field}


def test_missing_param(small):
    """A missing required param is -32602 naming it."""
    with pytest.raises(InvalidParams) as info:
        small.methods["geo.move"].coerce_params({"point": {"x": 1}})
    assert "'by'" in info.value.message
    assert info.value.data == {"field": "by"}


def test_missing_nested_member(small):
    """A missing required member of a nested object is named by its full path."""
    with pytest.raises(InvalidParams) as info:
        small.methods["geo.move"].coerce_params({"point": {}, "by": 1})
    assert info.value.data == {"field": "point.x"}


def test_unknown_param(small):
    """An unknown named param is refused, naming it."""
    with pytest.raises(InvalidParams) as info:
        small.methods["geo.move"].coerce_params({"point": {"x": 1}, "by": 1, "speed": 3})
    assert "speed" in info.value.message


def test_too_many_positional(small):
    """More positional params than declared is -32602."""
    with pytest.raises(InvalidParams) as info:
        small.methods["geo.move"].coerce_params([{"x": 1}, 1, "a", "extra"])
    assert "at most 3" in info.value.message


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("[service", "small.oschema"),
        ("[nonsense]\nx = 1", "unknown keys ['nonsense']"),
        ('[types.T]\ncolour = "red"', "unknown keys ['colour']"),
        ('[methods."m"]\nsumary = "typo"', "unknown keys ['sumary']"),
        ('[methods."m"]\nparams.p = { type = "Nope" }', "unknown type 'Nope'"),
        ('[types.T]\nfields.f = { type = "Nope" }', "unknown type 'Nope'"),
        ('[methods."m"]\nresult = { type = "Nope" }', "unknown type 'Nope'"),
        (
            '[methods."m"]\nparams.p = { type = "array", items = "Nope" }',
            "unknown type 'Nope'",
        ),
        ('[methods."m"]\nerrors = ["x"]', "errors must be a list of integer codes"),
        ('[methods."m"]\nerrors = 3', "errors must be a list of integer codes"),
        ('[methods."m"]\nerrors = [true]', "errors must be a list of integer codes"),
        ('[methods."m"]\nparams.p = 3', "expected a table"),
        ('[types.T]\nfields.f = { type = "string", pattern = "[" }', "[types.T]"),
        ('[types.T]\nfields.f = { minimum = "x" }', "[types.T]"),
        ('[methods."m"]\nresult = { type = 3 }', "result"),
        ("methods = 3", "expected a table"),
        ('[methods."m"]\nparams.p = { type = 3 }', "small.oschema"),
        ('[methods."m"]\nparams.p = { minimum = "x" }', "small.oschema"),
    ],
)
def test_schema_errors(text, complaint):
    """A file that is not TOML, or does not follow the format, is a SchemaError saying
    where and why."""
    with pytest.raises(SchemaError) as info:
        parse_schema(text, source="small.oschema")
    assert complaint in str(info.value)
    assert "small.oschema" in str(info.value)


@pytest.mark.parametrize("name", ["explorer", "node"])
def test_shipped_schemas_load(name):
    """The explorer and node schemas load, and every method's JSON Schema is valid."""
    schema = load_schema(name)
    assert schema.methods
    check = validators.validator_for(
        {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    ).check_schema
    for tschema in schema.types.values():
        check(tschema)


def test_explorer_methods_match_contract():
    """The explorer schema has the methods of CONTRACT §4, §6 and §9 with their params."""
    schema = load_schema("explorer")
    assert set(schema.methods) == {
        "explorer.heartbeat",
        "explorer.leave",
        "explorer.list_nodes",
        "explorer.get_node",
        "explorer.node_history",
        "explorer.remove_node",
        "explorer.call",
        "explorer.info",
        "explorer.create_token",
        "explorer.enroll",
        "explorer.renew",
        "explorer.revoke",
        "explorer.query_nodes",
        "explorer.summary",
        "explorer.ui_token_create",
        "explorer.ui_token_list",
        "explorer.ui_token_revoke",
        "explorer.place",
        "explorer.create_vm",
        # CONTRACT §10.
        "explorer.audit",
    }
    place = {p.name: p.required for p in schema.methods["explorer.place"].params}
    assert place == {
        "vcpus": True,
        "memory_mb": True,
        "disk_gb": True,
        "where": False,
        "strategy": False,
        # Beyond CONTRACT §9's list but named in its -32006 rule; create_vm uses it.
        "avoid": False,
    }
    heartbeat = {p.name: p.required for p in schema.methods["explorer.heartbeat"].params}
    assert heartbeat == {
        "node_id": True,
        "socket_path": True,
        "name": False,
        "version": False,
        "capacity": False,
        "usage": False,
        "vm_count": False,
        "labels": False,
        "secret": False,
        # Beyond CONTRACT §4: the delta heartbeat's (issue #12), optional.
        "session": False,
    }
    params = {
        m: [p.name for p in schema.methods[m].params]
        for m in (
            "explorer.create_token",
            "explorer.enroll",
            "explorer.renew",
            "explorer.revoke",
            "explorer.leave",
        )
    }
    assert params == {
        "explorer.create_token": ["ttl", "node_id"],
        "explorer.enroll": ["token", "csr"],
        "explorer.renew": ["csr"],
        "explorer.revoke": ["node_id"],
        "explorer.leave": ["node_id", "secret"],
    }
    assert "unix://" in schema.methods["explorer.heartbeat"].params[1].schema["description"]


def test_node_methods_match_contract():
    """The node schema has the methods of CONTRACT §4 and §8."""
    schema = load_schema("node")
    assert set(schema.methods) == {
        "node.info",
        "vm.create",
        "vm.start",
        "vm.stop",
        "vm.delete",
        "vm.get",
        "vm.list",
        "node.images",
        "image.import",
        "vm.console_log",
    }


def test_shipped_schema_validates_heartbeat():
    """A heartbeat with a wrong capacity is refused, naming the nested field."""
    heartbeat = load_schema("explorer").methods["explorer.heartbeat"]
    good = {
        "node_id": "n1",
        "socket_path": "unix:///x.sock",
        "capacity": {"vcpus": 4, "memory_mb": 1024, "disk_gb": 10},
    }
    assert heartbeat.coerce_params(good) == good
    with pytest.raises(InvalidParams) as info:
        heartbeat.coerce_params({**good, "capacity": {**good["capacity"], "vcpus": -1}})
    assert "capacity.vcpus" in info.value.message


@pytest.mark.parametrize("name", ["explorer", "node"])
def test_openrpc_document(name):
    """The OpenRPC document lists every method with params and result, and the types
    in components.schemas."""
    schema = load_schema(name)
    document = schema.openrpc("1.2.3")
    assert document["openrpc"].startswith("1.")
    assert document["info"] == {
        "title": schema.title,
        "description": schema.description,
        "version": "1.2.3",
    }
    by_name = {m["name"]: m for m in document["methods"]}
    assert set(by_name) == set(schema.methods) | {"rpc.discover"}
    for mname, method in schema.methods.items():
        entry = by_name[mname]
        assert [p["name"] for p in entry["params"]] == [p.name for p in method.params]
        assert all("schema" in p and "required" in p for p in entry["params"])
        assert entry["result"]["schema"] == method.result
        assert [e["code"] for e in entry["errors"]] == list(method.errors)
    assert document["components"]["schemas"] == schema.types


def test_openrpc_refs_resolve():
    """Every $ref in the OpenRPC document names one of its components.schemas."""
    document = load_schema("explorer").openrpc("1")
    refs = []

    def walk(value):
        if isinstance(value, dict):
            if "$ref" in value:
                refs.append(value["$ref"])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(document["methods"])
    walk(document["components"])
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"]


_toml_keys = st.sampled_from(
    [
        "service",
        "types",
        "methods",
        "fields",
        "params",
        "result",
        "type",
        "items",
        "optional",
        "errors",
        "x",
    ]
)
_toml_values = st.recursive(
    st.one_of(
        st.integers(),
        st.booleans(),
        st.text(max_size=8),
        st.sampled_from(['"integer"', '"T"', '"Nope"', '"string"']),
    ),
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda v: "[" + ", ".join(map(str, v)) + "]")
        | st.dictionaries(_toml_keys, inner, max_size=3).map(
            lambda d: "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"
        )
    ),
    max_leaves=6,
)
_toml_lines = st.one_of(
    st.sampled_from(
        ["[service]", "[types.T]", '[methods."m"]', "[methods]", "[types]", "[x]"]
    ),
    st.builds(lambda k1, k2, v: f"{k1}.{k2} = {v}", _toml_keys, _toml_keys, _toml_values),
    st.builds(lambda k, v: f"{k} = {v}", _toml_keys, _toml_values),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.lists(_toml_lines, max_size=12).map("\n".join)))
def test_fuzzed_schema_text(text):
    """Arbitrary text is either a Schema or a SchemaError, never another exception."""
    try:
        parse_schema(text)
    except SchemaError:
        pass


def test_errors_do_not_echo_large_values():
    """A refused 900 kB label key is not quoted back whole: the message stays small."""
    heartbeat = load_schema("explorer").methods["explorer.heartbeat"]
    big = "k" * 900_000
    with pytest.raises(InvalidParams) as e:
        heartbeat.coerce_params(
            {"node_id": "n1", "socket_path": "unix:///x.sock", "labels": {big: "v"}}
        )
    assert len(str(e.value)) < 1000 and len(e.value.data["field"] or "") < 1000


def test_every_missing_param_is_named():
    """All missing required params are named at once, not only the first."""
    heartbeat = load_schema("explorer").methods["explorer.heartbeat"]
    with pytest.raises(InvalidParams) as e:
        heartbeat.coerce_params({"name": "x"})
    assert "node_id" in str(e.value) and "socket_path" in str(e.value)
