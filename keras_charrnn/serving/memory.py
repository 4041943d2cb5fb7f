"""The serve process's memory: modules it never loads, malloc's arenas, and freed heap given back.

A ``charrnn serve`` process runs SavedModels on TensorFlow alone; these measures keep
what it holds to what it uses (see BENCHMARKS.md, "serving overhead profile"). Pure
Python: ``lean_server_process`` runs before TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import types
from collections.abc import Iterator

__all__ = [
    "SERVE_STUBBED_MODULES",
    "SERVE_UNUSED_MODULES",
    "NotLoaded",
    "lean_server_process",
    "release_freed_memory",
    "source_lines_unread",
]

SERVE_UNUSED_MODULES = ("jax", "keras", "h5py", "scipy")  # imported by `import tensorflow`, unused by `serve`
# Imported by `import tensorflow` without a guard, used only inside functions `serve` never calls: the profiler
# client's extension (tf.profiler.experimental.client; 18 MB of library pages touched on load) and requests
# (TensorFlow's GCE preemption helper and Keras' RemoteMonitor; with urllib3, charset_normalizer and every codec: 6 MB).
SERVE_STUBBED_MODULES = ("tensorflow.python.profiler.internal._pywrap_profiler_plugin", "requests")
M_ARENA_MAX = -8  # glibc's mallopt parameter


class NotLoaded(types.ModuleType):
    """A module ``charrnn serve`` never loads: importing it works, using it raises AttributeError."""

    def __getattr__(self, name: str):
        raise AttributeError(
            f"module {self.__name__!r} is not loaded in `charrnn serve` (to save memory); {name!r} is not available"
        )


def lean_server_process() -> None:
    """Memory settings for a serve process, made before TensorFlow is imported.

    ``import tensorflow`` brings in much the server never uses, each import guarded by
    TensorFlow so that a missing package is skipped: JAX (TensorFlow's lite module imports
    it when installed: about 110 MB resident), Keras (imported eagerly for its optimizers,
    and with it matplotlib and IPython: 66 MB), and h5py and SciPy (for TensorFlow's legacy
    Keras: 20 MB). They are marked unavailable here (``import keras`` raises ImportError,
    which TensorFlow handles); the serve path imports none of them itself. Two modules
    TensorFlow imports unguarded but uses only in functions the server never calls
    (``SERVE_STUBBED_MODULES``) import as ``NotLoaded`` modules. And glibc's malloc keeps at
    most 2 arenas (``MALLOC_ARENA_MAX``, unless the environment sets it), not 8 per core
    for the gRPC and batching threads.
    """
    for unused in SERVE_UNUSED_MODULES:
        if unused not in sys.modules:
            # `import keras` raises ImportError, which TensorFlow handles. typeshed types sys.modules as
            # dict[str, ModuleType], though None there is the import system's documented way to block a module.
            sys.modules[unused] = None  # type: ignore[assignment]
    for unused in SERVE_STUBBED_MODULES:
        if unused not in sys.modules:
            sys.modules[unused] = NotLoaded(unused)  # TensorFlow imports them unguarded, uses them in no serve path
    if "MALLOC_ARENA_MAX" not in os.environ:
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
        except (OSError, AttributeError):  # not glibc
            pass


@contextlib.contextmanager
def source_lines_unread() -> Iterator[None]:
    """Within it, nothing reads Python source files into ``linecache``; wrap ``import tensorflow`` in it.

    TensorFlow's registries (gradients, shape and proto functions) note where each entry was
    registered with ``traceback.extract_stack``, which reads the whole source file of every
    registering module into ``linecache`` (about 75 files: 8 MB a server keeps and never shows;
    a duplicate registration's error names the file and line, not the line's text).

    Example:

    >>> with source_lines_unread():
    ...     import tensorflow  # doctest: +SKIP
    """
    import linecache

    update = linecache.updatecache
    linecache.updatecache = lambda filename, module_globals=None: []  # no lines: frames keep file and line number
    try:
        yield
    finally:
        linecache.updatecache = update


def release_freed_memory() -> None:
    """Gives the heap that glibc's malloc holds free back to the system (``malloc_trim``); elsewhere nothing.

    Loading a model and XLA-compiling it for a batch size leave tens of MB of
    freed heap that malloc would otherwise keep.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
