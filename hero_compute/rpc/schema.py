"""
The ``.oschema`` format: a service's types and methods, from which we generate the
OpenRPC document served by ``rpc.discover`` and the JSON Schemas that validate params.

An ``.oschema`` file is TOML (read by the standard library's :obj:`tomllib`); this module
only gives the tables meaning:

    [service]                       title, description
    [types.NAME]                    description; fields.FIELD = FIELD-SPEC;
                                    closed = true (no other fields allowed)
    [methods."ns.name"]             summary, description, errors = [codes],
                                    params.PARAM = FIELD-SPEC, result = FIELD-SPEC

A FIELD-SPEC is a JSON Schema as a TOML table, with three additions:
  - ``optional = true`` makes the field or param not required (all are required otherwise);
  - ``type = "NAME"`` where NAME is one of the file's [types] is a reference to it;
  - ``items = "T"`` is short for ``items = {type = "T"}``.
Params are in declaration order, which is also the order of by-position params.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import attrs
import fastjsonschema
from jsonschema import exceptions as jsonschema_exceptions
from jsonschema import validators
from jsonschema.exceptions import best_match

from .errors import ERROR_MESSAGES, InvalidParams

JSON_TYPES = frozenset(
    ("string", "integer", "number", "boolean", "object", "array", "null")
)


class SchemaError(Exception):
    """An ``.oschema`` file that does not follow the format."""


@attrs.frozen
class Param:
    """
    One named parameter of a method.

    :ivar name: the parameter name
    :ivar schema: its JSON Schema
    :ivar required: whether a call must give it
    """

    name: str
    schema: dict[str, Any]
    required: bool


@attrs.frozen
class Method:
    """
    One method of a service: its params, result and errors, and the validator of its
    params.

    :ivar name: the method name, e.g. ``explorer.heartbeat``
    :ivar params: :obj:`Param`s in declaration order
    """

    name: str
    summary: str
    description: str
    params: tuple[Param, ...]
    result: dict[str, Any]
    errors: tuple[int, ...]
    _validator: Any = attrs.field(repr=False)  # a jsonschema validator
    # The same params schema compiled to Python by fastjsonschema: it decides whether
    # params are valid in microseconds (jsonschema interprets the schema at every call,
    # ~200 µs for a heartbeat: most of an explorer's ingest CPU).  jsonschema, the
    # reference, still explains what is wrong when they are not.
    _fast: Callable[[Any], Any] | None = attrs.field(repr=False, default=None)

    def coerce_params(self, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """
        Check a call's params against the schema and return them by name.

        :param params: the JSON-RPC ``params`` member: a dict, a list (by position, in
            declaration order) or None
        :return: a dict of keyword arguments for the handler
        :raise InvalidParams: naming the offending field
        """
        if params is None:
            params = {}
        elif isinstance(params, list):
            if len(params) > len(self.params):
                raise InvalidParams(
                    f"{self.name} takes at most {len(self.params)} params, "
                    f"{len(params)} given"
                )
            params = {p.name: value for p, value in zip(self.params, params, strict=False)}
        if self._fast is not None:
            try:
                self._fast(params)
                return params
            except fastjsonschema.JsonSchemaException as e:
                fast_error = e
        elif self._validator.is_valid(params):
            return params
        else:
            fast_error = None
        error: Any = best_match(self._validator.iter_errors(params))
        if error is None:
            # The two validators disagree; side with the stricter one and say why.
            field = ".".join(str(p) for p in getattr(fast_error, "path", [])[1:])
            message = getattr(fast_error, "message", "invalid")
        else:
            path = [str(part) for part in error.absolute_path]
            if error.validator == "required":
                # jsonschema reports a missing member at its parent: name the member.
                missing = [
                    name
                    for name in error.validator_value
                    if isinstance(error.instance, dict) and name not in error.instance
                ]
                path += missing[:1]
                if len(missing) > 1:
                    error.message = "missing required members: " + ", ".join(missing)
            field = ".".join(path)
            message = error.message
        # The message quotes the value it refuses: never echo a peer's megabyte back.
        field, message = _clip(field), _clip(message)
        where = f"{field}: " if field else ""
        raise InvalidParams(
            f"invalid params for {self.name}: {where}{message}",
            data={"field": field or None},
        )


#: Characters of a refused value (or its path) quoted back in an error message.
QUOTE_LIMIT = 200


def _clip(text: str) -> str:
    if len(text) <= QUOTE_LIMIT:
        return text
    return f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"


@attrs.frozen
class Schema:
    """
    A loaded ``.oschema``: the service's methods and named types.

    :ivar title: the service's title
    :ivar methods: :obj:`Method`s by name
    :ivar types: JSON Schemas of the named types, by name
    """

    title: str
    description: str
    methods: dict[str, Method]
    types: dict[str, dict[str, Any]]

    def openrpc(self, version: str) -> dict[str, Any]:
        """
        The OpenRPC document of this service.

        :param version: the service's version, for ``info.version``
        :return: a JSON-serialisable dict
        """
        methods: list[dict[str, Any]] = []
        for method in self.methods.values():
            methods.append(
                {
                    "name": method.name,
                    "summary": method.summary,
                    "description": method.description,
                    "paramStructure": "either",
                    "params": [
                        {"name": p.name, "required": p.required, "schema": p.schema}
                        for p in method.params
                    ],
                    "result": {"name": "result", "schema": method.result},
                    "errors": [
                        {"code": code, "message": ERROR_MESSAGES.get(code, "error")}
                        for code in method.errors
                    ],
                }
            )
        methods.append(
            {
                "name": "rpc.discover",
                "summary": "This service's OpenRPC document.",
                "params": [],
                "result": {"name": "openrpc", "schema": {"type": "object"}},
            }
        )
        return {
            "openrpc": "1.3.2",
            "info": {
                "title": self.title,
                "description": self.description,
                "version": version,
            },
            "methods": methods,
            "components": {"schemas": self.types},
        }


def load_schema(name: str) -> Schema:
    """
    Load one of the schemas shipped with hero_compute.

    :param name: ``"explorer"`` or ``"node"``
    :return: a :obj:`Schema`
    """
    return parse_schema(_schema_path(name).read_text("utf-8"), source=f"{name}.oschema")


def _schema_path(name: str) -> Traversable:
    # Installed, the schemas travel as the package data of hero_compute.schemas (see
    # setup.cfg); in a source checkout they are the top-level schemas/ folder.
    try:
        root: Traversable = resources.files("hero_compute.schemas")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "schemas"
    return root / name / f"{name}.oschema"


def parse_schema(text: str, source: str = "<schema>") -> Schema:
    """
    Parse the text of an ``.oschema`` file.

    :param text: the TOML text
    :param source: a name for error messages
    :return: a :obj:`Schema`
    :raise SchemaError: when the text is not TOML or does not follow the format
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SchemaError(f"{source}: {e}") from None
    _only(doc, {"service", "types", "methods"}, source)
    service = _table(doc.get("service", {}), f"{source}: [service]")
    type_tables = _table(doc.get("types", {}), f"{source}: [types]")
    names = frozenset(type_tables)
    types: dict[str, dict[str, Any]] = {}
    for tname, table in type_tables.items():
        where = f"{source}: [types.{tname}]"
        table = _table(table, where)
        _only(table, {"description", "fields", "closed"}, where)
        fields = _table(table.get("fields", {}), where)
        types[tname] = _object(fields, names, where, closed=table.get("closed") is True)
        types[tname]["description"] = table.get("description", "")
    validator_class = validators.validator_for(
        {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    )
    for tname, tschema in types.items():
        _check(validator_class, tschema, f"{source}: [types.{tname}]")
    methods: dict[str, Method] = {}
    for mname, table in _table(doc.get("methods", {}), f"{source}: [methods]").items():
        where = f"{source}: [methods.{mname!r}]"
        table = _table(table, where)
        _only(table, {"summary", "description", "params", "result", "errors"}, where)
        param_table = _table(table.get("params", {}), where)
        params = tuple(
            Param(
                pname,
                _field(spec, names, f"{where} param {pname}"),
                not _table(spec, where).get("optional", False),
            )
            for pname, spec in param_table.items()
        )
        params_schema = _object(param_table, names, where, closed=True)
        _check(validator_class, params_schema, where)
        params_schema["components"] = {"schemas": types}
        result = _field(table.get("result", {}), names, f"{where} result")
        _check(validator_class, result, f"{where} result")
        errors = table.get("errors", [])
        if not isinstance(errors, list) or not all(
            isinstance(code, int) and not isinstance(code, bool) for code in errors
        ):
            raise SchemaError(f"{where}: errors must be a list of integer codes")
        methods[mname] = Method(
            name=mname,
            summary=table.get("summary", ""),
            description=table.get("description", ""),
            params=params,
            result=result,
            errors=tuple(errors),
            validator=validator_class(params_schema),
            fast=_compile(params_schema, f"{where} params"),
        )
    return Schema(
        title=service.get("title", source),
        description=service.get("description", ""),
        methods=methods,
        types=types,
    )


def _compile(schema: dict[str, Any], where: str) -> Callable[[Any], Any]:
    try:
        return fastjsonschema.compile(schema)
    except (fastjsonschema.JsonSchemaDefinitionException, ValueError, TypeError) as e:
        raise SchemaError(f"{where}: {e}") from None


def _check(validator_class: Any, schema: dict[str, Any], where: str) -> None:
    # jsonschema's own SchemaError would escape as if the loader had crashed; a bad
    # field spec is a mistake in the file, to be reported with where it is.
    try:
        validator_class.check_schema(schema)
    except jsonschema_exceptions.SchemaError as e:
        path = ".".join(str(part) for part in e.path)
        raise SchemaError(f"{where}: {path + ': ' if path else ''}{e.message}") from None


def _object(
    fields: dict[str, Any], names: frozenset[str], where: str, closed: bool
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    for fname, spec in fields.items():
        schema["properties"][fname] = _field(spec, names, f"{where} field {fname}")
        if not _table(spec, where).get("optional", False):
            schema["required"].append(fname)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _field(table: object, names: frozenset[str], where: str) -> dict[str, Any]:
    spec = dict(_table(table, where))
    spec.pop("optional", None)
    kind = spec.get("type")
    if isinstance(kind, str) and kind not in JSON_TYPES:
        if kind not in names:
            raise SchemaError(f"{where}: unknown type {kind!r}")
        del spec["type"]
        spec["$ref"] = f"#/components/schemas/{kind}"
    items = spec.get("items")
    if isinstance(items, str):
        spec["items"] = _field({"type": items}, names, where)
    elif isinstance(items, dict):
        spec["items"] = _field(items, names, where)
    if isinstance(spec.get("additionalProperties"), dict):
        spec["additionalProperties"] = _field(spec["additionalProperties"], names, where)
    return spec


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected a table, got {value!r}")
    return value


def _only(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise SchemaError(f"{where}: unknown keys {sorted(unknown)}")
