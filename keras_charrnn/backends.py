"""Which Keras backend a training run uses: the ``--backend auto`` rule, and setting it before Keras starts.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so the choice is made from what
is known before that: the run's recorded backend on resume, the environment, what is installed
and the model's width (JAX trains wide models faster on CPU: BENCHMARKS.md, "Training throughput").
No Keras or TensorFlow is imported here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from keras_charrnn.errors import ConfigError

JAX_MIN_UNITS = 512  # the smallest layer width measured faster on JAX than on TensorFlow (BENCHMARKS.md, CPU)


def auto_backend(args: Any) -> tuple[str, str]:
    """The backend ``charrnn train --backend auto`` trains with, and why, decided before Keras is imported.

    Args:
        args: ``charrnn train``'s parsed arguments (an object with ``resume``, ``out``, ``distribute``, ``units``).

    Returns:
        ``(backend, reason)``: the run's recorded backend on ``--resume``; else ``$KERAS_BACKEND`` when set;
        else ``"tensorflow"`` under ``--distribute`` or when JAX is missing or the model is narrower than
        ``JAX_MIN_UNITS``; else ``"jax"``.

    Raises:
        ConfigError: a resumed run's recorded backend is not installed.
        InputError: the run to resume has no readable ``config.json``.
    """
    from keras_charrnn.run_folder import RunFolder

    if args.resume:
        recorded = RunFolder(args.out).backend()
        if recorded is not None:
            if importlib.util.find_spec(recorded) is None:
                raise ConfigError(
                    f"backend: this run trains on {recorded!r}, which is not installed here: "
                    f"pip install 'keras-charrnn[{recorded}]', or resume with --backend NAME"
                )
            return recorded, "the backend this run trains on"
    if "keras" in sys.modules:  # train() called in a process that already runs Keras
        import keras

        return keras.backend.backend(), "Keras already runs on it in this process"
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "$KERAS_BACKEND"
    if args.resume:
        return "tensorflow", "no backend recorded in this run: the default before 0.2.0"
    if args.distribute:
        return "tensorflow", "--distribute needs TensorFlow"
    if importlib.util.find_spec("jax") is None:
        return "tensorflow", "jax is not installed"
    if args.units < JAX_MIN_UNITS:
        return "tensorflow", f"faster than jax below {JAX_MIN_UNITS} units"
    return "jax", f"faster than tensorflow at {JAX_MIN_UNITS}+ units"


def choose_backend(name: str | None) -> None:
    """Sets KERAS_BACKEND for this process; Keras reads it once, when it is first imported.

    Args:
        name: "tensorflow" or "jax"; None leaves the environment's choice.

    Raises:
        ConfigError: the backend's package is not installed, or Keras already runs on another backend.
    """
    if not name:
        return
    if name == "jax" and importlib.util.find_spec("jax") is None:  # else Keras fails inside its own import
        raise ConfigError("backend 'jax' needs the jax package: pip install 'keras-charrnn[jax]'")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise ConfigError(
                f"backend {name!r}: Keras is already running on {keras.backend.backend()!r} in this "
                f"process; set KERAS_BACKEND={name} before it starts"
            )
    os.environ["KERAS_BACKEND"] = name
