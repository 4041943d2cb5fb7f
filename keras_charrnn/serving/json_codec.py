"""TF Serving's JSON tensors: a ``:predict`` body's inputs as NumPy arrays typed by the signature, and outputs back.

The REST API's codec (``rest`` handles the HTTP): a body is parsed with a depth limit
(``parse_json``), its ``instances`` (row format) or ``inputs`` (columnar) become arrays of
the signature's dtypes (``request_arrays``), and the outputs become ``predictions`` or
``outputs`` (``response_json``). Binary strings travel as ``{"b64": "..."}``; string
outputs whose name ends in ``_bytes`` (and any that are not UTF-8) go back that way.

The generation inputs of ``keras_charrnn.generation``'s table keep their names: ``stop``
is a list of strings per row (rows may hold different numbers: the shorter lists are
padded with empty strings, which never match), ``logit_bias`` a list of one number per id.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from keras_charrnn.errors import ServingError
from keras_charrnn.generation import BY_NAME
from keras_charrnn.serving.wire import DT_BOOL, DT_FLOAT, DT_INT32, DT_INT64, DT_STRING

__all__ = ["MAX_JSON_DEPTH", "json_to_array", "parse_json", "request_arrays", "response_json"]

MAX_JSON_DEPTH = 32  # deeper JSON is refused before it is walked
_NUMPY = {DT_FLOAT: np.float32, DT_INT32: np.int32, DT_INT64: np.int64, DT_BOOL: np.bool_, DT_STRING: object}
_DTYPE_NAME = {DT_FLOAT: "float", DT_INT32: "int32", DT_STRING: "string", DT_INT64: "int64", DT_BOOL: "bool"}
_INT_RANGE = {DT_INT32: (-(2**31), 2**31 - 1), DT_INT64: (-(2**63), 2**63 - 1)}


def _invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----- JSON -> NumPy, typed by the signature -------------------------------------------------


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _json_depth_ok(document, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (list, dict)))
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (list, dict)))
    return True


def _scalar(value, dtype: int, name: str):
    if dtype == DT_STRING:
        if isinstance(value, str):
            return value.encode("utf-8")
        if _is_b64(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise _invalid(f"input {name!r}: unable to base64 decode {_short(value)}") from None
        if isinstance(value, dict):
            raise _invalid(f"input {name!r}: JSON value {_short(value)} not formatted correctly for base64 data")
    elif dtype == DT_FLOAT:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
    elif dtype == DT_BOOL:
        if isinstance(value, bool):
            return value
    raise _invalid(f"input {name!r}: JSON value {_short(value)} is not of expected type {_DTYPE_NAME[dtype]}")


def json_to_array(value, dtype: int, name: str) -> np.ndarray:
    """One tensor in TF Serving's JSON form (a value or dense nested lists) as a NumPy array.

    Args:
        value: the parsed JSON.
        dtype: the signature input's ``DataType`` enum value.
        name: the input's name (for messages).

    Returns:
        The array (strings as ``bytes`` objects).

    Raises:
        ServingError: INVALID_ARGUMENT for a ragged list, a value of the wrong type, bad base64,
            or a dtype this server does not take over REST.

    Example:

    >>> json_to_array([[1, 2], [3, 4]], DT_INT32, "ids").shape
    (2, 2)
    """
    if dtype not in _NUMPY:
        raise _invalid(f"input {name!r}: its dtype (DataType {dtype}) is not supported by this server's REST API")
    shape, probe = [], value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat = []

    def fill(item, level):
        if isinstance(item, list):
            if level >= len(shape) or len(item) != shape[level]:
                raise _invalid(f"input {name!r}: the nested lists are not a dense tensor of shape {shape}")
            for element in item:
                fill(element, level + 1)
        elif level != len(shape):
            raise _invalid(f"input {name!r}: the nested lists are not a dense tensor of shape {shape}")
        else:
            flat.append(_scalar(item, dtype, name))

    fill(value, 0)
    array = np.empty(len(flat), dtype=object) if dtype == DT_STRING else np.array(flat, dtype=_NUMPY[dtype])
    if dtype == DT_STRING:
        array[:] = flat
    return array.reshape(shape)


def request_arrays(body: dict, input_infos) -> tuple[dict[str, np.ndarray], str]:
    """The input tensors of a ``:predict`` body, in either of TF Serving's formats.

    Args:
        body: the parsed request: ``instances`` (row format) or ``inputs`` (columnar).
        input_infos: the signature's inputs (name -> ``TensorInfo``).

    Returns:
        The arrays by input name, and the format: ``"row"`` or ``"columnar"``.

    Raises:
        ServingError: INVALID_ARGUMENT for a body that does not fit the signature.
    """
    names = sorted(input_infos)
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("the request must hold exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    if "inputs" in body:
        value = body["inputs"]
        if not isinstance(value, dict) or _is_b64(value):
            if len(names) != 1:
                raise _invalid(
                    f"inputs is a plain value/list, but the signature takes {len(names)} named inputs "
                    f"{names}: give an object"
                )
            value = {names[0]: value}
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _invalid(f"unexpected input(s) {unknown} in 'inputs'; the signature takes {names}")
        missing = [n for n in names if n not in value]
        if missing:
            raise _invalid(f"missing named input(s) {missing} in 'inputs' object")
        return {n: json_to_array(_padded(n, value[n]), input_infos[n].dtype, n) for n in names}, "columnar"

    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise _invalid("'instances' must be a non-empty list")
    if not names:
        raise _invalid('the signature takes no inputs: use the columnar format, {"inputs": {}}')
    as_objects = isinstance(rows[0], dict) and not _is_b64(rows[0])
    if not as_objects and len(names) > 1:
        raise _invalid(
            f"instances is a plain list, but the signature takes {len(names)} named inputs {names}: "
            f"give a list of objects"
        )
    if as_objects:
        rows = _padded_rows(rows, names)
    columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if as_objects:
            if not isinstance(row, dict) or _is_b64(row):
                raise _invalid(f"expecting an object but got {_short(row)} at item {i} of 'instances'")
            if set(row) != set(names):
                raise _invalid(f"item {i} of 'instances' has keys {sorted(row)}; they must be {names}")
        elif isinstance(row, dict) and not _is_b64(row):
            raise _invalid(f"expecting a value/list but got an object at item {i} of 'instances'")
        for n in names:
            array = json_to_array(row[n] if as_objects else row, input_infos[n].dtype, n)
            if columns[n] and array.shape != columns[n][0].shape:
                raise _invalid(
                    f"input {n!r}: item {i} of 'instances' has shape {list(array.shape)}, "
                    f"item 0 has {list(columns[n][0].shape)}"
                )
            columns[n].append(array)
    return {n: np.stack(columns[n]) for n in names}, "row"


def _ragged(name: str) -> bool:
    """Whether rows of input ``name`` may hold lists of different lengths (``stop``: padded with "")."""
    spec = BY_NAME.get(name)
    return spec is not None and spec.row_shape == ("stops",)


def _pad(lists: list) -> list:
    """Lists of strings padded with empty strings to the longest (anything else as it is)."""
    if not all(isinstance(item, list) for item in lists):
        return lists
    width = max((len(item) for item in lists), default=0)
    return [item + [""] * (width - len(item)) for item in lists]


def _padded(name: str, value):
    """A columnar input, its rows' lists padded to one length where the input allows it (``_ragged``)."""
    return _pad(value) if _ragged(name) and isinstance(value, list) else value


def _padded_rows(rows: list, names: list[str]) -> list:
    """Row-format instances, each ragged input's lists padded to one length across rows."""
    ragged = [n for n in names if _ragged(n) and all(isinstance(r, dict) and isinstance(r.get(n), list) for r in rows)]
    if not ragged:
        return rows
    rows = [dict(r) for r in rows]
    for name in ragged:
        for row, value in zip(rows, _pad([r[name] for r in rows])):
            row[name] = value
    return rows


# ----- NumPy -> JSON ------------------------------------------------------------------------


def _jsonable(array: np.ndarray, name: str):
    if array.dtype != object:
        return array.tolist()
    as_b64 = name.endswith("_bytes")

    def convert(item):
        if isinstance(item, list):
            return [convert(x) for x in item]
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        if not as_b64:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass  # not text: binary, as TF Serving writes a *_bytes output
        return {"b64": base64.b64encode(data).decode("ascii")}

    return convert(array.tolist())


def response_json(outputs: dict[str, np.ndarray], form: str) -> dict:
    """A predict answer in TF Serving's JSON: ``predictions`` (row format) or ``outputs`` (columnar).

    One output is given bare; several by name (a list of objects in the row format).

    Args:
        outputs: the output arrays by name.
        form: ``"row"`` or ``"columnar"``, the request's format.

    Returns:
        The JSON-ready answer.

    Raises:
        ServingError: INVALID_ARGUMENT when row format meets outputs of different batch sizes.
    """
    names = sorted(outputs)
    if form == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(outputs[names[0]], names[0])}
        return {"outputs": {n: _jsonable(outputs[n], n) for n in names}}
    sizes = {outputs[n].shape[0] if outputs[n].ndim else None for n in names}
    size = sizes.pop() if len(sizes) == 1 else None
    if size is None:
        raise _invalid("the outputs do not share one batch size; use the columnar format ('inputs')")
    columns = {n: _jsonable(outputs[n], n) for n in names}
    if len(names) == 1:
        return {"predictions": columns[names[0]]}
    return {"predictions": [{n: columns[n][i] for n in names} for i in range(size)]}


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (NaN and Infinity allowed, as TF Serving does).

    Args:
        body: the HTTP request body (UTF-8 JSON).

    Returns:
        The parsed object.

    Raises:
        ServingError: INVALID_ARGUMENT for an empty, malformed, too deeply nested or non-object body.
    """
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid("JSON Parse error: the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise _invalid(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(document, dict):
        raise _invalid(f"JSON Value: {_short(document)} Is not object")
    if not _json_depth_ok(document):
        raise _invalid(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels")
    return document
