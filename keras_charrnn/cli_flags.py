"""Command-line flags made from the settings dataclasses: one flag per field, with its type, default and help.

``TrainConfig`` gives ``charrnn train`` its flags (``batch_size`` -> ``--batch-size``) and
``ServerOptions`` gives ``charrnn serve`` TF Serving's (names keep their underscores); the
dataclass field's metadata holds the help text and how the value is read.
"""

from __future__ import annotations

import argparse
import dataclasses

from keras_charrnn.config import parse_duration
from keras_charrnn.errors import ConfigError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _duration(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# How a TrainConfig field's annotation reads its flag's text (a field named in _FLAG_PARSERS: that parser).
_FLAG_TYPES = {"int": int, "float": float, "str": str, "float | None": _optional_float, "int | None": _optional_int}
_FLAG_PARSERS = {"time_budget": _duration}


class _StoreGiven(argparse.Action):
    """Stores a flag's value and notes that it was given (in ``namespace.given``), so ``--resume`` can tell
    a flag typed on the command line from a default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = frozenset(getattr(namespace, "given", frozenset())) | {self.dest}


def add_config_flags(p, config_class) -> None:
    """One flag per field of a config dataclass (``batch_size`` -> ``--batch-size``), with its default and help.

    Fields that a resumed run may change say so in their help.
    """
    p.set_defaults(given=frozenset())
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + ("; may change on --resume" if f.metadata.get("on_resume") else "")
        if f.type == "bool":
            p.add_argument(
                flag,
                dest=f.name,
                action=_StoreGiven,
                nargs=0,
                const=True,
                default=f.default,
                help=f"{help_text} (default: off)",
            )
            continue
        p.add_argument(
            flag,
            dest=f.name,
            action=_StoreGiven,
            type=_FLAG_PARSERS.get(f.name, _FLAG_TYPES[str(f.type)]),
            default=f.default,
            choices=f.metadata.get("choices"),
            help=f"{help_text} (default: %(default)s)",
        )


def add_option_flags(p, options_class) -> None:
    """One flag per field of ``ServerOptions`` (names keep their underscores, as TF Serving's flags do).

    Args:
        p: the subcommand's parser.
        options_class: the options dataclass; each field's metadata holds its help, whether it takes
            a positive integer, and whether a boolean takes ``true``/``false`` (else it is a switch).
    """
    for f in dataclasses.fields(options_class):
        flag, help_text = "--" + f.name, f.metadata.get("help", "")
        if f.type == "bool" and f.metadata.get("true_false"):
            p.add_argument(
                flag,
                type=_true_false,
                nargs="?",
                const=True,
                default=f.default,
                help=f"{help_text} (default: {str(f.default).lower()})",
            )
        elif f.type == "bool":
            p.add_argument(flag, action="store_true", help=f"{help_text} (default: off)")
        else:
            kind = positive_int if f.metadata.get("positive") else _FLAG_TYPES[f.type.replace(" | None", "")]
            p.add_argument(
                flag,
                type=kind,
                default=f.default,
                help=help_text + ("" if f.default is None else " (default: %(default)s)"),
            )


def _true_false(text: str) -> bool:
    """TF Serving's boolean flag values: true/false (also 1/0)."""
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
