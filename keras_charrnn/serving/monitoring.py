"""Prometheus metrics of the embedded model server, under TensorFlow Serving's metric names.

``charrnn serve --monitoring_config_file FILE`` takes TF Serving's
``MonitoringConfig`` text format::

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

and, with Prometheus enabled, serves the metrics at that path (the default
above) on the REST port. The names, labels, units (microseconds) and buckets
are TF Serving's, as its Prometheus exporter writes them (``/`` becomes ``:``):

- ``:tensorflow:serving:request_count{model_name, status}``: every Predict
  (gRPC) and every REST call, by status code name (``OK``, ``NOT_FOUND``, ...).
- ``:tensorflow:serving:request_latency{model_name, API, entrypoint}``: wall
  time of the calls that succeeded (``API`` ``Predict`` on ``GRPC``, the REST
  method, e.g. ``predict``, on ``REST``).
- ``:tensorflow:cc:saved_model:load_attempt_count{model_path, status}``
  (``success``/``fail``) and ``:tensorflow:cc:saved_model:load_latency{model_path}``
  (a counter of microseconds spent loading, warm-up included).
- ``:tensorflow:serving:batching_session:{input_batch_size, processed_batch_size,
  padding_size{execution_batch_size}, queuing_latency{thread_pool_name},
  wrapped_run_count}`` with ``--enable_batching``.

plus prometheus_client's process, platform and garbage-collector metrics
(``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...).

The server code records through the module functions (``record_request``,
``record_load``, ``record_batch``); they cost a lock and a dict update.
"""

from __future__ import annotations

import bisect
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.utils import floatToGoString

from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.serving.config_files import MonitoringConfig, read_text_proto

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THREAD_POOL_NAME = "batch_threads"  # BatchingParameters.thread_pool_name's default in TF Serving


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's ``Buckets::Exponential``: upper bounds ``scale * growth**i`` for ``i < count``.

    Args:
        scale: the first bound.
        growth: the ratio of neighbouring bounds.
        count: how many bounds (``+Inf`` follows them).

    Returns:
        The finite bucket bounds.

    Example:

    >>> exponential_buckets(10, 1.8, 4)
    (10.0, 18.0, 32.4, 58.32)
    """
    return tuple(float(f"{scale * growth**i:.6g}") for i in range(count))  # 6 digits, as TF Serving prints them


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)  # request_latency: 10 us .. ~20 minutes
QUEUING_BUCKETS = exponential_buckets(100, 1.2, 52)  # batching_session/queuing_latency: 100 us .. ~1 s
BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)  # batching_session/*_batch_size, padding_size


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def add(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...]
    bounds: tuple[float, ...] = ()


REQUEST_COUNT = _Family(
    ":tensorflow:serving:request_count", "counter", "The total number of requests.", ("model_name", "status")
)
REQUEST_LATENCY = _Family(
    ":tensorflow:serving:request_latency",
    "histogram",
    "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
    ("model_name", "API", "entrypoint"),
    LATENCY_BUCKETS,
)
LOAD_ATTEMPT_COUNT = _Family(
    ":tensorflow:cc:saved_model:load_attempt_count",
    "counter",
    "The number of times a SavedModel was successfully loaded.",
    ("model_path", "status"),
)
LOAD_LATENCY = _Family(
    ":tensorflow:cc:saved_model:load_latency",
    "counter",
    "Latency in microseconds for SavedModels that were successfully loaded.",
    ("model_path",),
)
QUEUING_LATENCY = _Family(
    ":tensorflow:serving:batching_session:queuing_latency",
    "histogram",
    "Distribution of wall time spent (in microseconds) in queuing",
    ("thread_pool_name",),
    QUEUING_BUCKETS,
)
INPUT_BATCH_SIZE = _Family(
    ":tensorflow:serving:batching_session:input_batch_size",
    "histogram",
    "Tracks the batch size distribution on the inputs.",
    (),
    BATCH_SIZE_BUCKETS,
)
PROCESSED_BATCH_SIZE = _Family(
    ":tensorflow:serving:batching_session:processed_batch_size",
    "histogram",
    "Tracks the batch size distribution on processing.",
    (),
    BATCH_SIZE_BUCKETS,
)
PADDING_SIZE = _Family(
    ":tensorflow:serving:batching_session:padding_size",
    "histogram",
    "Tracks the padding size distribution on batches.",
    ("execution_batch_size",),
    BATCH_SIZE_BUCKETS,
)
WRAPPED_RUN_COUNT = _Family(
    ":tensorflow:serving:batching_session:wrapped_run_count",
    "counter",
    "Total count of run calls on the wrapped session",
    (),
)
FAMILIES = (
    REQUEST_COUNT,
    REQUEST_LATENCY,
    LOAD_ATTEMPT_COUNT,
    LOAD_LATENCY,
    QUEUING_LATENCY,
    INPUT_BATCH_SIZE,
    PROCESSED_BATCH_SIZE,
    PADDING_SIZE,
    WRAPPED_RUN_COUNT,
)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class ServerMetrics:
    """The server's TF Serving metrics: counters and histograms keyed by label values.

    Thread-safe. ``exposition()`` writes them in Prometheus' text format the
    way TF Serving's exporter does (a counter keeps its name: no ``_total``),
    followed by prometheus_client's process, platform and GC collectors.

    Example:

    >>> m = ServerMetrics()
    >>> m.record_request("shakespeare", "predict", "REST", "OK", 0.002)
    >>> m.value(":tensorflow:serving:request_count", model_name="shakespeare", status="OK")
    1.0
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[_Family, dict[tuple[str, ...], float | _Histogram]] = {f: {} for f in FAMILIES}
        self._process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self._process)
        PlatformCollector(registry=self._process)
        GCCollector(registry=self._process)

    def _add(self, family: _Family, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            cells = self._values[family]
            if family.kind == "counter":
                count = cells.get(labels, 0.0)
                assert not isinstance(count, _Histogram)  # a counter's cells are numbers
                cells[labels] = count + value
            else:
                histogram = cells.setdefault(labels, _Histogram(family.bounds))
                assert isinstance(histogram, _Histogram)  # a histogram's cells are histograms
                histogram.add(value)

    def record_request(self, model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        """Counts one call by status; its latency too when it succeeded (as TF Serving does).

        Args:
            model_name: the model the call named.
            api: ``Predict`` (gRPC) or the REST method (``predict``, or ``""`` for GET).
            entrypoint: ``GRPC`` or ``REST``.
            status: a ``tensorflow.error.Code`` name: ``OK``, ``INVALID_ARGUMENT``, ...
            seconds: the call's wall time.
        """
        self._add(REQUEST_COUNT, (model_name, status), 1)
        if status == "OK":
            self._add(REQUEST_LATENCY, (model_name, api, entrypoint), seconds * 1e6)

    def record_load(self, model_path: str | Path, ok: bool, seconds: float) -> None:
        """Counts one SavedModel load attempt; a successful one adds its time to the load latency.

        Args:
            model_path: the version folder.
            ok: whether it loaded.
            seconds: how long loading (and warming up) took.
        """
        self._add(LOAD_ATTEMPT_COUNT, (str(model_path), "success" if ok else "fail"), 1)
        if ok:
            self._add(LOAD_LATENCY, (str(model_path),), seconds * 1e6)

    def record_batch(self, call_rows: list[int], queued_seconds: list[float], padded_size: int) -> None:
        """Records one batch the request batcher ran.

        Args:
            call_rows: each merged call's rows (its input batch size).
            queued_seconds: how long each call waited in the queue.
            padded_size: the batch size the model ran on (after padding).
        """
        for rows in call_rows:
            self._add(INPUT_BATCH_SIZE, (), rows)
        for seconds in queued_seconds:
            self._add(QUEUING_LATENCY, (THREAD_POOL_NAME,), seconds * 1e6)
        self._add(PROCESSED_BATCH_SIZE, (), padded_size)
        self._add(PADDING_SIZE, (str(padded_size),), padded_size - sum(call_rows))
        self._add(WRAPPED_RUN_COUNT, (), 1)

    def value(self, name: str, **labels: str) -> float:
        """A counter's value, or a histogram's count, for one label set (0 when never recorded).

        Args:
            name: the metric's exported name, e.g. ``:tensorflow:serving:request_count``.
            **labels: every label of the metric.

        Returns:
            The value.
        """
        family = next(f for f in FAMILIES if f.name == name)
        with self._lock:
            cell = self._values[family].get(tuple(labels[k] for k in family.labels))
        if cell is None:
            return 0.0
        return float(sum(cell.counts)) if isinstance(cell, _Histogram) else float(cell)

    def exposition(self) -> bytes:
        """All metrics in Prometheus' text format (version 0.0.4)."""
        lines = []
        with self._lock:
            for family in FAMILIES:
                cells = self._values[family]
                if not cells:
                    continue
                lines.append(f"# HELP {family.name} {family.help}")
                lines.append(f"# TYPE {family.name} {family.kind}")
                for labels, cell in sorted(cells.items()):
                    pairs = [f'{k}="{_escape(v)}"' for k, v in zip(family.labels, labels)]
                    if family.kind == "counter":
                        lines.append(f"{family.name}{{{','.join(pairs)}}} {floatToGoString(cell)}")
                        continue
                    assert isinstance(cell, _Histogram)  # a histogram's cells are histograms
                    cumulative = 0
                    for bound, count in zip(family.bounds + (float("inf"),), cell.counts):
                        cumulative += count
                        le = ",".join(pairs + [f'le="{floatToGoString(bound)}"'])
                        lines.append(f"{family.name}_bucket{{{le}}} {cumulative}")
                    lines.append(f"{family.name}_sum{{{','.join(pairs)}}} {floatToGoString(cell.total)}")
                    lines.append(f"{family.name}_count{{{','.join(pairs)}}} {cumulative}")
        text = "\n".join(lines) + "\n" if lines else ""
        return text.encode("utf-8") + generate_latest(self._process)


METRICS = ServerMetrics()  # the process's metrics, as TF Serving's are process-wide


def record_request(model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
    """``METRICS.record_request``: see ``ServerMetrics.record_request``."""
    METRICS.record_request(model_name, api, entrypoint, status, seconds)


def record_load(model_path: str | Path, ok: bool, seconds: float) -> None:
    """``METRICS.record_load``: see ``ServerMetrics.record_load``."""
    METRICS.record_load(model_path, ok, seconds)


def record_batch(call_rows: list[int], queued_seconds: list[float], padded_size: int) -> None:
    """``METRICS.record_batch``: see ``ServerMetrics.record_batch``."""
    METRICS.record_batch(call_rows, queued_seconds, padded_size)


@contextmanager
def track_request(model_name: str, api: str, entrypoint: str) -> Iterator[None]:
    """Times the block and records it as one request: ``OK``, the ``ServingError``'s code, or ``INTERNAL``.

    Args:
        model_name: the model the call named.
        api: the API's name (``Predict`` for gRPC, the REST method).
        entrypoint: ``GRPC`` or ``REST``.

    Example:

    >>> with track_request("shakespeare", "Predict", "GRPC"):  # doctest: +SKIP
    ...     response = servicer.predict(request)
    """
    start = time.perf_counter()
    status = "INTERNAL"
    try:
        yield
        status = "OK"
    except ServingError as exc:
        status = exc.code
        raise
    finally:
        record_request(model_name, api, entrypoint, status, time.perf_counter() - start)


@dataclass(frozen=True)
class PrometheusSettings:
    """What ``--monitoring_config_file`` asks for.

    Args:
        enable: serve the metrics.
        path: the HTTP path they are served at.
    """

    enable: bool = False
    path: str = DEFAULT_PATH


def read_monitoring_config(path: str | Path | None) -> PrometheusSettings:
    """Reads TF Serving's ``MonitoringConfig`` text file.

    Args:
        path: the file, or None (monitoring off).

    Returns:
        The Prometheus settings; ``path`` defaults to ``/monitoring/prometheus/metrics``.

    Raises:
        ConfigError: the file is missing or invalid, or its path does not start with ``/``.

    Example:

    >>> read_monitoring_config(None)
    PrometheusSettings(enable=False, path='/monitoring/prometheus/metrics')
    """
    if not path:
        return PrometheusSettings()
    config = read_text_proto(path, MonitoringConfig()).prometheus_config
    metrics_path = config.path or DEFAULT_PATH
    if not metrics_path.startswith("/"):
        raise ConfigError(f"{path}: prometheus_config.path must start with '/', got {metrics_path!r}")
    return PrometheusSettings(config.enable, metrics_path)
