"""``charrnn sample``'s flags and output: stops, scores, several samples, JSON, and the interactive mode.

The generation flags come from the table of generation inputs (``generation.INPUTS``:
each input's ``flag``, ``help`` and default), so a new input's flag reads as its
Python parameter and REST field do. The text goes to standard output as it is
generated; each sample's finish reason and scores go to standard error, one line
per sample (``--json`` prints one JSON object per sample on standard output instead).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import numpy as np

from keras_charrnn.cli_flags import positive_int
from keras_charrnn.errors import ConfigError
from keras_charrnn.generation import BY_NAME, LOGPROBS_OFF, MAX_LOGPROBS, MAX_SAMPLES, Completion, RuleError, check_rows
from keras_charrnn.sampling import DEFAULT_CHUNK, DEFAULT_PRIME, SamplingParams
from keras_charrnn.session import ModelInfo, Session

DEFAULT_NUM_CHARS = 500  # characters ``charrnn sample`` generates (the cap in the interactive mode)
INTERACTIVE_STOP = "\n\n"  # the interactive mode's default stop: the model answers until a blank line
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", "'": "'", '"': '"'}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
_NUMBER_TYPES: dict[str, Callable[[str], Any]] = {"int32": int, "int64": int, "float32": float}


def unescape(text: str) -> str:
    """A flag's text with backslash escapes read as in Python strings (``\\n``, ``\\t``, ``\\x41``, ``\\u00e9``).

    Args:
        text: the flag's value as typed (other characters, non-ASCII ones included, stay as they are).

    Returns:
        The text with the escapes replaced; an unknown escape (``\\q``) stays as typed.

    Example:

    >>> unescape(r"\\n\\nEND") == "\\n\\nEND"
    True
    """

    def one(match: re.Match) -> str:
        code = match.group(1)
        if len(code) > 1:
            return chr(int(code[1:], 16))
        return _ESCAPES.get(code, match.group(0))

    return _ESCAPE.sub(one, text)


def stop_string(text: str) -> str:
    """``--stop``'s value: a non-empty string, escapes understood."""
    value = unescape(text)
    if not value:
        raise argparse.ArgumentTypeError("a stop string must hold at least one character")
    return value


def bias_entry(text: str) -> dict[str, float]:
    """``--bias``'s value ``CHARACTERS=VALUE`` (escapes understood): each character gets the value.

    Args:
        text: e.g. ``0123456789=-100`` (bans digits) or ``\\n=2`` (favours line ends).

    Returns:
        ``{character: value}``.

    Raises:
        argparse.ArgumentTypeError: no ``=``, no characters, or a value that is not a number.

    Example:

    >>> bias_entry("ab=-100")
    {'a': -100.0, 'b': -100.0}
    """
    chars, sep, value = text.rpartition("=")
    chars = unescape(chars)
    if not sep or not chars:
        raise argparse.ArgumentTypeError(f"expected CHARACTERS=VALUE (e.g. '0123456789=-100'), got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value after '=' must be a number, got {value!r} in {text!r}") from None
    return dict.fromkeys(chars, number)


def _top_logprobs(text: str) -> int:
    value = positive_int(text)
    if value > MAX_LOGPROBS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LOGPROBS}, got {value}")
    return value


def _num_samples(text: str) -> int:
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SAMPLES}, got {value}")
    return value


def add_input_flag(
    p: argparse.ArgumentParser, name: str, *aliases: str, more_help: str = "", help: str | None = None, **kwargs: Any
) -> None:
    """Adds the flag of one generation input, with the table's flag name, help and default.

    Args:
        p: the subcommand's parser.
        name: the input's name in ``generation.INPUTS`` (also the flag's ``dest``).
        *aliases: short forms (``-n``).
        more_help: text added after the table's help.
        help: the flag's own help instead of the table's (where the flag reads its value differently).
        **kwargs: ``add_argument`` settings that replace the table's (``type``, ``default``, ``action``).
    """
    spec = BY_NAME[name]
    assert spec.flag is not None, f"{name} has no flag in the table"
    settings: dict[str, Any] = {"dest": name, "default": spec.default}
    if spec.row_shape == () and spec.dtype in _NUMBER_TYPES:
        settings["type"] = _NUMBER_TYPES[spec.dtype]
    settings.update(kwargs)
    settings = {k: v for k, v in settings.items() if not (k == "type" and v is None)}
    shown = settings["default"]
    if shown is False:
        default = " (default: off)"
    elif shown is None or settings.get("action") == "append":
        default = ""
    else:
        default = " (default: %(default)s)"
    p.add_argument(*aliases, spec.flag, help=(spec.help if help is None else help) + more_help + default, **settings)


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``charrnn sample``'s generation: the table's inputs, then the output options.

    Args:
        p: the ``sample`` subcommand's parser.
    """
    p.add_argument("--prime", default=DEFAULT_PRIME, help="text to start from (default: a newline)")
    add_input_flag(p, "num_chars", "-n", type=positive_int, default=DEFAULT_NUM_CHARS, more_help="; the cap")
    for name in ("temperature", "top_k", "top_p", "min_p"):
        add_input_flag(p, name)
    add_input_flag(p, "seed", more_help=" (default: random)")
    add_input_flag(
        p, "stop", type=stop_string, action="append", default=None, more_help=" (repeatable; escapes like \\n work)"
    )
    add_input_flag(p, "min_chars")
    add_input_flag(
        p,
        "logit_bias",
        type=bias_entry,
        action="append",
        default=None,
        metavar="CHARS=VALUE",
        more_help=": each of CHARS gets VALUE, e.g. '0123456789=-100' (repeatable; escapes like \\n work)",
    )
    add_input_flag(
        p,
        "logprobs",
        action="store_true",
        default=False,
        type=None,
        help="score each character: its log-probability under the model (on stderr: the total and the least "
        "likely character; with --json: each)",
    )
    p.add_argument(
        "--top-logprobs",
        type=_top_logprobs,
        default=None,
        metavar="N",
        help=f"also the N (1..{MAX_LOGPROBS}) most likely alternatives of each character (implies --logprobs)",
    )
    p.add_argument(
        "--num-samples",
        type=_num_samples,
        default=1,
        metavar="N",
        help=f"N samples from the prime (up to {MAX_SAMPLES}); sample i has a seed derived from --seed and i, "
        "sample 0 is the text of --seed alone (default: %(default)s)",
    )
    p.add_argument(
        "--strip-stop", action="store_true", help="leave the matched stop string out of the text (default: off)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per sample (index, text, finish_reason, stop, num_chars, seed, scores) "
        "instead of the text (default: off)",
    )
    p.add_argument(
        "--chunk", type=positive_int, default=DEFAULT_CHUNK, help="characters per model call (default: %(default)s)"
    )


def sampling_params(args: argparse.Namespace, default_stop: Sequence[str] = ()) -> SamplingParams:
    """The ``SamplingParams`` of ``charrnn sample``'s flags (checked: a bad value is a ``ConfigError``).

    Args:
        args: the parsed flags.
        default_stop: the stop strings when no ``--stop`` is given.

    Returns:
        The parameters.
    """
    bias: dict[str, float] = {}
    for entry in args.logit_bias or ():
        bias.update(entry)
    stop = tuple(args.stop) if args.stop else tuple(default_stop)
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, args.min_p, bias, stop, args.min_chars)


def logprobs_wanted(args: argparse.Namespace) -> int:
    """The ``logprobs`` the flags ask for: -1 (none), 0 (``--logprobs``) or N (``--top-logprobs N``)."""
    if args.top_logprobs:
        return int(args.top_logprobs)
    return 0 if args.logprobs else LOGPROBS_OFF


def check_stops(stops: Sequence[str], info: ModelInfo) -> None:
    """Refuses stop strings the model could never generate (a character outside its vocabulary).

    Args:
        stops: the stop strings.
        info: the model's facts (its ``vocabulary``; unknown: nothing checked here, the model checks).

    Raises:
        ConfigError: the table's message for ``stop`` (it names the string and the characters).
    """
    if not stops or info.vocabulary is None:
        return
    try:
        check_rows({"stop": np.array([list(stops)], dtype=object)}, info.context(), info.vocabulary)
    except RuleError as exc:
        raise ConfigError(exc.message) from None


def interactive_stop(args: argparse.Namespace, info: ModelInfo) -> tuple[str, ...]:
    """The interactive mode's stops: ``--stop``'s, else a blank line where the model can match one.

    A model exported before stops existed (no ``generate_text_v2``), or one without a newline in its
    vocabulary, answers ``--num-chars`` characters as before.
    """
    if args.stop:
        return tuple(args.stop)
    if not info.controlled or (info.vocabulary is not None and "\n" not in info.vocabulary):
        return ()
    return (INTERACTIVE_STOP,)


class _HeldBack:
    """Writes streamed text, holding back what may turn out to be a stop string that ``--strip-stop`` leaves out.

    Args:
        out: where the text goes.
        hold: characters to hold back (the longest stop string's length minus one; 0: none).
    """

    def __init__(self, out: TextIO, hold: int):
        self.out, self.hold, self.buffer, self.written = out, hold, "", ""

    def write(self, piece: Completion, strip: bool) -> None:
        """Writes ``piece``'s text; at a stop (with ``strip``), all but the stop string."""
        self.buffer += piece.text
        if piece.finish_reason == "stop" and strip and piece.stop:
            self._emit(self.buffer[: len(self.buffer) - len(piece.stop)])
        elif piece.finish_reason == "stop" or not self.hold:
            self._emit(self.buffer)
        else:
            self._emit(self.buffer[: -self.hold])
            return
        self.buffer = ""

    def flush(self) -> None:
        """Writes what is held back (generation ended without a stop)."""
        self._emit(self.buffer)
        self.buffer = ""

    def _emit(self, text: str) -> None:
        self.buffer = self.buffer[len(text) :]
        self.written += text
        self.out.write(text)
        self.out.flush()


def stream_text(session: Session, num_chars: int, chunk: int, logprobs: int, strip: bool, out: TextIO) -> Completion:
    """Streams one session's text to ``out`` as it is generated, ending at a stop.

    Args:
        session: the session.
        num_chars: the most characters.
        chunk: characters per model call.
        logprobs: as in ``Session.complete``.
        strip: leave the matched stop string out.
        out: where the text goes.

    Returns:
        The whole ``Completion`` (its text as generated, the stop included).
    """
    writer = _HeldBack(out, max((len(s) for s in session.params.stop), default=1) - 1 if strip else 0)
    for piece in session.stream_completions(num_chars, chunk, logprobs):
        writer.write(piece, strip)
    writer.flush()
    assert session.last is not None
    return session.last


def record(completion: Completion, strip: bool) -> dict[str, Any]:
    """A sample's JSON object (``Completion.to_dict``); with ``strip``, its text and scores end before the stop."""
    data = completion.to_dict()
    if strip:
        kept = len(completion.text_without_stop)
        data["text"] = completion.text_without_stop
        for key in ("logprobs", "top_logprobs"):
            if key in data:
                data[key] = data[key][:kept]
    return data


def summary(completion: Completion) -> str:
    """One readable line: the sample's finish reason, its length and (when scored) its log-probability.

    Example:

    >>> summary(Completion("ab\\n", "stop", "\\n", 3, index=0, seed=7))
    "sample 0 (seed 7): stop at '\\\\n' after 3 characters"
    """
    if completion.finish_reason == "stop":
        ended = f"stop at {completion.stop!r} after {completion.num_chars} characters"
    else:
        ended = f"length: {completion.num_chars} characters"
    line = f"sample {completion.index} (seed {completion.seed}): {ended}"
    if completion.logprobs:
        total = sum(completion.logprobs)
        line += f"; log-prob {total:.3f} ({total / len(completion.logprobs):.3f} per character)"
        worst = min(range(len(completion.logprobs)), key=completion.logprobs.__getitem__)
        line += f"; least likely {completion.text[worst]!r} at {worst} ({completion.logprobs[worst]:.3f}"
        if completion.top_logprobs:
            others = ", ".join(f"{c!r} {v:.3f}" for c, v in completion.top_logprobs[worst].items())
            line += f"; top: {others}"
        line += ")"
    return line


def write_samples(
    session: Session, args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> None:
    """``charrnn sample``'s output: each sample's text (prime first) on ``out`` and its summary on ``err``,
    or its JSON object on ``out`` with ``--json``.

    Args:
        session: a new session on the prime (sample 0 continues it; the others are forks with derived seeds).
        args: the parsed flags.
        out: standard output.
        err: standard error.
    """
    logprobs = logprobs_wanted(args)
    if args.num_samples == 1 and not args.json:
        out.write(args.prime)
        done = stream_text(session, args.num_chars, args.chunk, logprobs, args.strip_stop, out)
        out.write("\n")
        out.flush()
        _write_line(err, summary(done))
        return
    results: Iterable[Completion]
    if args.num_samples == 1:
        results = [session.complete(args.num_chars, logprobs)]
    else:
        results = session.samples(args.num_samples, args.num_chars, logprobs)
    for result in results:
        if args.json:
            _write_line(out, json.dumps(record(result, args.strip_stop), ensure_ascii=False))
            continue
        _write_line(out, args.prime + (result.text_without_stop if args.strip_stop else result.text))
        _write_line(err, summary(result))


def _write_line(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def interactive(make: Callable[[str], Session], args: argparse.Namespace, stops: Sequence[str]) -> None:
    """The interactive mode: type a line, the model answers until a stop (the cap: ``--num-chars``).

    The reply is fed into the same session (``Session.feed``), whose state is exactly at the
    end of the answer (the stop included), so the conversation reads as one text.

    Args:
        make: opens a session on a prime.
        args: the parsed flags.
        stops: the stop strings (empty: each answer is ``--num-chars`` characters long).
    """
    until = "until " + " or ".join(repr(s) for s in stops) if stops else f"for {args.num_chars} characters"
    print(f"type a line and the model answers {until}; an empty line lets it go on; Ctrl-D quits")
    session = None
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if session is None:
            session = make((line or args.prime) + "\n")
        elif line:
            session.feed(line + "\n")
        done = stream_text(session, args.num_chars, args.chunk, logprobs_wanted(args), args.strip_stop, sys.stdout)
        shown = done.text_without_stop if args.strip_stop else done.text
        if not shown.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
