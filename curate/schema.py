"""Column contracts: the JSON Schemas in schemas/ and the Arrow schemas built from them.

Code imports column lists from here, so a stage can only write columns the schema knows."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # a link to the repo's schemas/; a copy in wheels
# One chat message as chat templates and trainers read it (OpenAI's fields). Optional fields are null
# when a message does not have them; `arguments` is the JSON text of the call's arguments.
FUNCTION_CALL = pa.struct([("name", pa.string()), ("arguments", pa.string())])
TOOL_CALL = pa.struct([("id", pa.string()), ("type", pa.string()), ("function", FUNCTION_CALL)])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(TOOL_CALL)),
                     ("tool_call_id", pa.string()), ("name", pa.string()), ("reasoning_content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

TOP_MODULE = pa.struct([("module", pa.string()), ("role", pa.string()), ("layer", pa.int32()), ("share", pa.float32())])
_X_ARROW = {"float32": pa.float32(), "float64": pa.float64(), "int32": pa.int32(),
            "list<float32>": pa.list_(pa.float32()), "list<int32>": pa.list_(pa.int32()),
            "top_modules": pa.list_(TOP_MODULE)}
_JSON_TYPE = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


@lru_cache(maxsize=None)
def load_json_schema(name: str) -> dict:
    """schemas/NAME.schema.json, parsed (cached: do not modify it); FileNotFoundError for an unknown name."""
    path = SCHEMA_DIR / f"{name}.schema.json"
    return json.loads(path.read_text())


def _arrow_type(prop: dict) -> pa.DataType:
    if "x-arrow" in prop:
        return _X_ARROW[prop["x-arrow"]]
    if "$ref" in prop and prop["$ref"].endswith("/messages"):
        return MESSAGES
    kind = prop["type"]
    if isinstance(kind, list):  # ["string", "null"]: nullability is Arrow's default
        kind = next(k for k in kind if k != "null")
    if kind == "array" and prop["items"].get("type") == "object":
        return MESSAGES
    return _JSON_TYPE[kind]


@lru_cache(maxsize=None)
def arrow_schema(name: str) -> pa.Schema:
    """Arrow schema for a JSON Schema in schemas/, fields in declaration order."""
    props = load_json_schema(name)["properties"]
    return pa.schema([pa.field(col, _arrow_type(p)) for col, p in props.items()])


def columns(name: str) -> tuple[str, ...]:
    """Column names of schemas/NAME.schema.json, in declaration order."""
    return tuple(arrow_schema(name).names)


def check_declared(names, schema_name: str) -> None:
    """ValueError naming the columns among `names` that schemas/<schema_name>.schema.json does not declare:
    rows are built from the schema's names, so such a column (a new signal stage's) would vanish silently."""
    unknown = sorted(set(names) - set(arrow_schema(schema_name).names))
    if unknown:
        raise ValueError(f"column(s) {', '.join(unknown)} are not declared in schemas/{schema_name}.schema.json: "
                         "declare them there (with their type) for the rows to carry them")


RECORD = "record"
ROUTED = "routed"
# Columns a routed row has beyond the canonical record, written by the signal stages.
TOKEN_COLUMNS = ("n_tokens", "n_loss_tokens", "truncated")
PROBE_COLUMNS = ("probe_loss", "grad_norms", "grad_norm_total")
PREFIX_COLUMNS = ("demo", "demo_len_tokens", "cut_points")
METRICS = ("gini", "cv", "kurtosis", "magnitude", "random")
NORM_METRICS = ("gini", "cv", "kurtosis", "magnitude")  # functions of the norms alone: the probe stores them
