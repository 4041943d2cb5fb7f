"""The ``charrnn`` command: train, export, sample, eval, serve, demo, visualize.

Every user error ends in one line ``charrnn: error: ...`` on stderr and exit
status 2, never a traceback. TensorFlow is imported only by the subcommands
that need it, so ``charrnn --help`` is instant, and only after the checks that
need no model (a missing file, a bad flag value, a run folder with nothing to
resume), so those are answered at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from keras_charrnn import __version__, cli_sample, demo
from keras_charrnn.backends import JAX_MIN_UNITS, auto_backend, choose_backend
from keras_charrnn.bundled import bundled_model_path
from keras_charrnn.cli_flags import add_config_flags, add_option_flags, positive_int
from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import CharRNNError, ConfigError
from keras_charrnn.sampling import DEFAULT_CHUNK, DEFAULT_TEMPERATURE
from keras_charrnn.serving import memory
from keras_charrnn.serving.options import ServerOptions
from keras_charrnn.versions import DEFAULT_BASE_PATH

DESCRIPTION = "Character-level RNN language models on Keras, served with TensorFlow Serving's gRPC API."


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line naming it, not the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        print(f"charrnn: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a UTF-8 text file, a folder of them or a glob")
    p.add_argument(
        "corpus",
        help="UTF-8 text file, folder (every file under it, sorted; hidden ones left out) "
        "or quoted glob pattern such as 'src/**/*.py'; files are joined with a blank line",
    )
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, samples, best model); required")
    add_config_flags(p, TrainConfig)
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a corpus file that is not UTF-8 (default: off, such files are skipped with a warning)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings; "
        "only flags marked 'may change on --resume' may be given with a new value (default: off)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no Keras progress bar: one line per epoch instead (default: off; always so when standard "
        "output is not a terminal, e.g. a log file)",
    )
    p.add_argument(
        "--distribute",
        choices=("mirrored", "multi-worker"),
        default=None,
        help="train under tf.distribute: 'mirrored' on every local GPU (or CPU device), 'multi-worker' "
        "on the cluster in TF_CONFIG; --batch-size stays the global batch (default: one device)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "tensorflow", "jax"),
        default="auto",
        help="Keras backend to train with; jax needs 'pip install keras-charrnn[jax]'. auto: on --resume "
        "the run's recorded backend, else $KERAS_BACKEND when set, else jax when installed for a model "
        f"of {JAX_MIN_UNITS}+ units without --distribute (faster there), else tensorflow "
        "(default: %(default)s)",
    )


def _run_train(args) -> None:
    from keras_charrnn.run_folder import RunFolder, check_training_inputs

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    given = {name: values[name] for name in args.given}
    if not args.resume and values["time_budget"] is not None and args.distribute:
        raise ConfigError("time_budget works on one device: leave out distribute, or time_budget")
    # train() makes these checks too; made here, before TensorFlow is imported, a typo is answered at once.
    check_training_inputs(args.corpus, RunFolder(args.out), TrainConfig(**values), args.resume, given)
    if args.backend == "auto":
        backend, why = auto_backend(args)
    else:
        backend, why = args.backend, "--backend"
    choose_backend(backend)
    print(f"charrnn train: {args.out}, backend {backend} ({why})", flush=True)
    import_tensorflow_quietly()
    from keras_charrnn.train import train

    verbose = 0 if args.quiet else "auto"  # auto: no bar when stdout is not a terminal (train's doc)
    if args.resume:
        train(
            args.corpus,
            args.out,
            resume=True,
            changes=given,
            verbose=verbose,
            strict=args.strict,
            strategy=args.distribute,
        )
    elif values["time_budget"] is not None:
        from keras_charrnn.budget import plan_budget

        config, stop = plan_budget(args.corpus, args.out, TrainConfig(**values), fixed=args.given, strict=args.strict)
        train(args.corpus, args.out, config, callbacks=[stop], verbose=verbose, strict=args.strict)
    else:
        train(
            args.corpus, args.out, TrainConfig(**values), verbose=verbose, strict=args.strict, strategy=args.distribute
        )
    print(f"run saved in {args.out}: export it with 'charrnn export {args.out} --name NAME'")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run as a TF Serving SavedModel (saved_models/NAME/VERSION)")
    p.add_argument("run_dir", help="run folder written by 'charrnn train'")
    p.add_argument("--name", required=True, help="model name (folder under --base-path)")
    p.add_argument("--base-path", default=DEFAULT_BASE_PATH, help="folder of all models (default: %(default)s)")
    p.add_argument("--version", type=positive_int, default=None, help="version number (default: next integer)")
    p.add_argument(
        "--which",
        choices=["best", "latest"],
        default="best",
        help="best model by validation loss (default) or the latest weights",
    )
    p.add_argument(
        "--xla",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the XLA-compiled twins generate_xla and generate_text_xla, which clients prefer "
        "where the server has XLA JIT (default: on; the default signatures never need XLA)",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument(
        "--warmup-batch-sizes",
        type=_batch_sizes,
        default=None,
        metavar="N,N,...",
        help="batch sizes of the warm-up records in assets.extra (default 1,2,4,8)",
    )
    sizes.add_argument(
        "--batching-parameters-file",
        default=None,
        metavar="FILE",
        help="warm the batch sizes this BatchingParameters file pads to (e.g. serving/batching_parameters.txt)",
    )
    p.add_argument(
        "--warmup-xla",
        action="store_true",
        help="warm the XLA twins too: only for servers run with --xla_cpu_compilation_enabled=true "
        "(a stock server then fails to load the model)",
    )


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _run_export(args) -> None:
    from keras_charrnn import warmup
    from keras_charrnn.export import export_run
    from keras_charrnn.serving.settings import batch_sizes_from_batching_parameters

    sizes = args.warmup_batch_sizes or warmup.DEFAULT_BATCH_SIZES
    if args.batching_parameters_file:
        sizes = batch_sizes_from_batching_parameters(args.batching_parameters_file)
    path = export_run(
        args.run_dir,
        args.name,
        args.base_path,
        args.version,
        args.which,
        xla=args.xla,
        warmup_batch_sizes=sizes,
        warmup_xla=args.warmup_xla,
    )
    print(f"exported {path}")


MODEL_HELP = "SavedModel folder (saved_models/NAME or a version folder) or training run folder"


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a SavedModel (in-process) or a model server (gRPC)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", help=MODEL_HELP + " (default: the bundled Shakespeare model)")
    where.add_argument("--server", help="model server address, e.g. localhost:8500")
    p.add_argument("--name", default=None, help="model name on the server (with --server)")
    p.add_argument("--version", type=positive_int, default=None, help="pin this model version (with --server)")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="type a line, the model answers until a stop (default: a blank line; --num-chars is the cap), "
        "your next line is fed into the same session",
    )
    cli_sample.add_sample_flags(p)


def _check_model_path(path: str) -> None:
    """Refuses a ``--model`` path that holds nothing to load, before TensorFlow is imported.

    Args:
        path: what ``--model`` names.

    Raises:
        InputError: neither a training run folder nor a SavedModel folder with a version
            (``inprocess.load`` decides the same way, with the same functions).
    """
    from keras_charrnn.run_folder import RunFolder
    from keras_charrnn.versions import latest_version_dir

    if not RunFolder.is_run(path):
        latest_version_dir(path)


def _run_sample(args) -> None:
    params = cli_sample.sampling_params(args)  # checked before a model is loaded: a bad value is answered at once
    if args.server:
        if not args.name:
            raise ConfigError("sampling from a server needs the model's name there (--name)")
        from keras_charrnn.serving.client import SamplingClient

        client = SamplingClient(args.server)
        info = client.model_info(args.name, args.version)
        open_session = lambda prime, p: client.session(args.name, prime, p, version=info.version)  # noqa: E731
    else:
        path = args.model or str(bundled_model_path())
        _check_model_path(path)
        import_tensorflow_quietly()
        from keras_charrnn.inprocess import load

        model = load(path)
        info = model.info
        open_session = lambda prime, p: model.session(prime, p)  # noqa: E731
    if args.interactive:
        stops = cli_sample.interactive_stop(args, info)
        cli_sample.check_stops(stops, info)
        params = cli_sample.sampling_params(args, default_stop=stops)
        cli_sample.interactive(lambda prime: open_session(prime, params), args, stops)
        return
    cli_sample.check_stops(params.stop, info)
    cli_sample.write_samples(open_session(args.prime, params), args)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, bits per character and perplexity of a text file")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("file", help="UTF-8 text file")


def _run_eval(args) -> None:
    from keras_charrnn.corpus import read_text

    text = read_text(args.file)  # before TensorFlow: a bad file is answered at once
    _check_model_path(args.model)
    import_tensorflow_quietly()
    from keras_charrnn.inprocess import load

    result = load(args.model).score(text)
    print(
        f"{args.file}: {result['chars']} characters  loss {result['loss']:.4f} nats/char  "
        f"bpc {result['bits_per_char']:.4f}  perplexity {result['perplexity']:.3f}"
    )


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="TF Serving-compatible gRPC model server (tensorflow_model_server's flags)")
    add_option_flags(p, ServerOptions)
    p.add_argument(
        "--log_level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="debug also logs every call received and every batch run",
    )


def _serve_flag(setting: str) -> str:
    """How ``charrnn serve`` sets a server setting: the flag of its name (what the server's callers are told)."""
    return f"charrnn serve --{setting}"


def _run_serve(args) -> None:
    import logging

    from keras_charrnn.serving.server import ModelServer

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=max(level, logging.INFO), format="charrnn serve: %(message)s")
    logging.getLogger("charrnn").setLevel(level)  # debug lines from the server only, not from every library
    options = ServerOptions(**{k: v for k, v in vars(args).items() if k in ServerOptions.__dataclass_fields__})
    server = ModelServer(options, name_setting=_serve_flag)
    port = server.start()
    if server.rest_port:
        print(f"REST API on port {server.rest_port}", flush=True)
    print(f"serving on port {port}", flush=True)
    server.serve_until_signal()


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="serve saved_models/ (or the bundled model) and stream generated text over gRPC")
    p.add_argument("--train", metavar="CORPUS", default=None, help="first train a small model on this text file")
    p.add_argument(
        "--minutes", type=float, default=demo.DEMO_MINUTES, help="training time with --train (default: %(default)s)"
    )
    p.add_argument(
        "--base-path",
        default=None,
        help=f"folder of the models to serve (default: {DEFAULT_BASE_PATH} when it holds a model or with "
        "--train, else the model bundled with the package)",
    )
    p.add_argument("--name", default=None, help="model to sample (default: shakespeare, or the first found)")
    p.add_argument("--prime", default=demo.DEMO_PRIME, help="text to start from (default: %(default)s)")
    p.add_argument("--calls", type=positive_int, default=demo.DEMO_CALLS, help="number of gRPC calls")
    p.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK, help="characters per call")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--seed", type=int, default=demo.DEMO_SEED)


def _run_demo(args) -> None:
    if args.train:
        import_tensorflow_quietly()
    demo.run_demo(
        args.base_path,
        args.name,
        args.train,
        args.minutes,
        args.prime,
        args.calls,
        args.chunk,
        args.temperature,
        args.seed,
    )


def _int_list(text: str) -> list[int]:
    try:
        return [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="HTML page of hidden-unit activations and next-character guesses")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("text_file", help="UTF-8 text to analyse")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--layer", type=int, default=None, help="only this layer (default: all)")
    p.add_argument(
        "--units", type=_int_list, default=None, help="comma-separated unit numbers (default: best-scoring first)"
    )
    p.add_argument("--top", type=positive_int, default=5, help="next-character guesses shown per character")
    p.add_argument("--max-chars", type=positive_int, default=5000, help="analyse at most this many characters")


def _run_visualize(args) -> None:
    from keras_charrnn.corpus import read_text
    from keras_charrnn.run_folder import RunFolder

    text = read_text(args.text_file)[: args.max_chars]  # before TensorFlow: a bad file is answered at once
    _check_model_path(args.model)
    import_tensorflow_quietly()
    from keras_charrnn.analysis import inspect
    from keras_charrnn.inprocess import load
    from keras_charrnn.report import write_report

    model = load(args.model)
    result = inspect(model, text, top=args.top)
    curves = RunFolder(args.model).curves_path if RunFolder.is_run(args.model) else None
    out = write_report(
        result,
        args.out,
        model.info.name,
        layer=args.layer,
        units=args.units,
        curves=curves.resolve().as_uri() if curves and curves.is_file() else None,
    )
    print(f"wrote {out} ({len(text)} characters, {result.bits_per_char:.3f} bpc)")


def build_parser() -> argparse.ArgumentParser:
    """The ``charrnn`` argument parser, one subcommand per job (train, export, sample, eval, serve, demo, visualize).

    Returns:
        The parser; a bad flag makes it print one line and exit with status 2.

    Example:

    >>> build_parser().parse_args(["export", "runs/tiny", "--name", "tiny"]).base_path
    'saved_models'
    """
    parser = OneLineParser(prog="charrnn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (_add_train, _add_export, _add_sample, _add_eval, _add_serve, _add_demo, _add_visualize):
        add(sub)
    return parser


COMMANDS = {
    "train": _run_train,
    "export": _run_export,
    "sample": _run_sample,
    "eval": _run_eval,
    "serve": _run_serve,
    "demo": _run_demo,
    "visualize": _run_visualize,
}
# Commands that import TensorFlow before they run; train, eval, visualize and sample import it themselves,
# after the checks that need no model.
NEEDS_TENSORFLOW = {"export", "serve"}


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its start-up banner (CUDA probing, oneDNN notes) hidden.

    TensorFlow's C++ logging writes those lines to file descriptor 2 before
    any setting can silence them, so stderr is pointed at /dev/null for the
    length of the import.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Runs ``charrnn``: parses the arguments and runs the subcommand.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after a one-line ``charrnn: error: ...`` on stderr for a ``CharRNNError``.
    """
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "backend", "auto") != "auto":  # a missing package is answered before anything else
            choose_backend(args.backend)
        if args.command == "serve":
            memory.lean_server_process()  # before TensorFlow is imported
            with memory.source_lines_unread():
                import_tensorflow_quietly()
        elif args.command in NEEDS_TENSORFLOW:
            import_tensorflow_quietly()
        COMMANDS[args.command](args)
    except CharRNNError as exc:
        print(f"charrnn: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout left (``charrnn sample | head``): nothing more is wanted. Python's recipe
        # (docs: signal, "Note on SIGPIPE"): point stdout at devnull so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("charrnn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
