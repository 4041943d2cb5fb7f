"""The ``charrnn`` command: train, export, sample, eval, serve, demo, visualize.

Every user error ends in one line ``charrnn: error: ...`` on stderr and exit
status 2, never a traceback. TensorFlow is imported only by the subcommands
that need it, so ``charrnn --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_charrnn.config import TrainConfig

DESCRIPTION = "Character-level RNN language models on Keras, served with TensorFlow Serving's gRPC API."


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line naming it, not the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        print(f"charrnn: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a UTF-8 text file")
    p.add_argument("corpus", help="UTF-8 text file")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, best model)")
    d = TrainConfig()
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], default=d.cell)
    p.add_argument("--layers", type=_positive_int, default=d.layers)
    p.add_argument("--units", type=_positive_int, default=d.units)
    p.add_argument("--embedding-dim", type=_positive_int, default=d.embedding_dim)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len)
    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default=d.lr_schedule)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm, help="clip gradients by global norm (default 5)")
    p.add_argument("--clip-value", type=float, default=None, help="clip each gradient element (turns off --clip-norm)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--val-frac", type=float, default=d.val_frac)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="batches between checkpoints")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the per-epoch line")


def _run_train(args) -> None:

    clip_norm = None if args.clip_value is not None else args.clip_norm
    config = TrainConfig(cell=args.cell, layers=args.layers, units=args.units, embedding_dim=args.embedding_dim,
                         dropout=args.dropout, batch_size=args.batch_size, seq_len=args.seq_len,
                         epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule, clip_norm=clip_norm,
                         clip_value=args.clip_value, val_frac=args.val_frac, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    if not args.resume:
        config.validate()
    from keras_charrnn.train import train

    train(args.corpus, args.out, config, resume=args.resume, verbose=0 if args.quiet else "auto")
    print(f"run saved in {args.out}: export it with 'charrnn export {args.out} --name NAME'")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="charrnn", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_train(sub)
    return parser


COMMANDS = {"train": _run_train}
NEEDS_TENSORFLOW = {"train"}


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
    args = build_parser().parse_args(argv)
    from keras_charrnn.errors import CharRNNError

    try:
        if args.command in NEEDS_TENSORFLOW:
            import_tensorflow_quietly()
        COMMANDS[args.command](args)
    except CharRNNError as exc:
        print(f"charrnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("charrnn: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        print(f"charrnn: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
