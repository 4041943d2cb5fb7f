"""Protocol-buffer message classes built at run time from a short field list.

Used for the few TensorFlow Serving messages that the ``tensorflow-serving-api``
wheel does not ship (``BatchingParameters``, ``SSLConfig``) and for the light
client's wire-compatible copies of the messages it sends (so that apps that
only generate text need not import TensorFlow). Field names, numbers and
types are TF Serving's; ``tests/test_wire_compat.py`` checks every message
against the real one.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
TYPES = {
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}


def make_messages(
    file_name: str,
    package: str,
    messages: dict,
    enums: dict | None = None,
    dependencies: tuple[str, ...] = (),
    pool: descriptor_pool.DescriptorPool | None = None,
) -> dict:
    """Builds message classes from a compact description.

    Args:
        file_name: the .proto file name the descriptors claim (unique per pool).
        package: the proto package, e.g. ``"tensorflow.serving"``.
        messages: ``{"Name": [(field, number, type, repeated), ...]}``; ``type`` is a
            scalar name from ``TYPES``, a message name (``".pkg.Name"`` for a full
            name, or a bare name in this file), an enum as ``"enum:Name"``, or
            ``("map", key, value)``.
        enums: ``{"Name": {"VALUE": number, ...}}``.
        dependencies: .proto files whose types are referenced (in this pool or protobuf's default one).
        pool: the descriptor pool; a private one by default.

    Returns:
        ``{"Name": message_class}`` for every message.
    """
    pool = pool or descriptor_pool.DescriptorPool()
    for dependency in dependencies:  # e.g. google/protobuf/wrappers.proto, copied from protobuf's own pool
        try:
            pool.FindFileByName(dependency)
        except KeyError:
            copy = descriptor_pb2.FileDescriptorProto()
            descriptor_pool.Default().FindFileByName(dependency).CopyToProto(copy)
            pool.Add(copy)
    proto = descriptor_pb2.FileDescriptorProto(
        name=file_name, package=package, syntax="proto3", dependency=list(dependencies)
    )
    enums = enums or {}
    for name, values in enums.items():
        enum = proto.enum_type.add(name=name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)
    for name, fields in messages.items():
        message = proto.message_type.add(name=name)
        for field_name, number, ftype, repeated in fields:
            field = message.field.add(
                name=field_name, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            )
            if isinstance(ftype, tuple):  # a map: a repeated nested entry message
                _, key_type, value_type = ftype
                entry_name = "".join(p.capitalize() for p in field_name.split("_")) + "Entry"
                entry = message.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                _set_type(entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL), key_type, package)
                _set_type(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value_type, package)
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{package}.{name}.{entry_name}"
            else:
                _set_type(field, ftype, package)
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}")) for name in messages}


def _set_type(field, ftype: str, package: str) -> None:
    if ftype in TYPES:
        field.type = TYPES[ftype]
        return
    is_enum = ftype.startswith("enum:")
    name = ftype[len("enum:") :] if is_enum else ftype
    field.type = _F.TYPE_ENUM if is_enum else _F.TYPE_MESSAGE
    field.type_name = name if name.startswith(".") else f".{package}.{name}"
