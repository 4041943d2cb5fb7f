"""gRPC sampling client: sessions that keep the hidden state between calls to a model server.

Works with ``charrnn serve`` and with TensorFlow Serving's ``tensorflow_model_server``
alike: it uses only ``PredictionService/Predict`` and ``GetModelMetadata``,
with TF Serving's messages (light copies, see ``wire.py``), and never imports
TensorFlow.

Example::

    from keras_charrnn.serving.client import SamplingClient

    client = SamplingClient(["localhost:8500", "localhost:8501"])
    session = client.session("shakespeare", prime="ROMEO:", temperature=0.8, seed=1)
    print(session.generate(200))
    print(client.complete("shakespeare", "ROMEO:", 500, stop=["\n\n"], seed=1, logprobs=2).finish_reason)
    for text in session.stream(500, chunk=64):
        print(text, end="", flush=True)
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator

import grpc
import numpy as np

from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.generation import LOGPROBS_OFF, Completion
from keras_charrnn.sampling import DEFAULT_PRIME, SamplingParams
from keras_charrnn.serving.stream_client import stream_predict
from keras_charrnn.serving import model_metadata, wire
from keras_charrnn.serving.client_errors import RETRYABLE, ServerError, VersionGoneError, version_gone
from keras_charrnn.serving.tls import TLS
from keras_charrnn.session import ModelInfo, Session, _is_int
from keras_charrnn.xla import is_xla_unavailable, xla_twin

log = logging.getLogger("charrnn.client")

__all__ = ["LIMIT_NAMES", "SamplingClient", "ServerError", "TLS", "VersionGoneError"]

LIMIT_NAMES = model_metadata.LIMIT_NAMES  # request limits a server may advertise (and a client may set)
NOT_FOUND_MEMORY = 5.0  # seconds a replica that lacked a pinned version is asked last for it
LATEST_TTL = 10.0  # seconds the newest version of a model is taken as known before it is asked again
MAX_CACHED_INFOS = 32


class SamplingClient:
    """Talks to one model server or several replicas of it, spreading calls over the healthy ones.

    Every call (``Predict``, ``GetModelMetadata``) goes to the next replica in turn
    (round robin). A replica that answers UNAVAILABLE is skipped for ``down_time``
    seconds (doubling while it stays down, up to 8x), then tried again, so one
    that recovers gets its share again. UNAVAILABLE, DEADLINE_EXCEEDED and
    RESOURCE_EXHAUSTED are retried (on another replica when there is one, with
    exponential backoff otherwise), at most ``retries`` times and never past the
    call's overall ``timeout``. NOT_FOUND for a pinned version asks the other
    replicas before giving up (``VersionGoneError``). Sessions hold all their
    state, so any replica can answer any call.

    Args:
        targets: ``"host:port"`` or a list of them (replicas serving the same models).
        tls: TLS settings; None for a plaintext channel.
        timeout: the most seconds one call may take, all its attempts and backoffs included.
        retries: how many times a call is retried after a retryable failure.
        backoff: first backoff delay in seconds (doubles, with jitter).
        down_time: seconds a replica that answered UNAVAILABLE is skipped.
        attempt_timeout: the most seconds one attempt may take (None: what is left of ``timeout``);
            lower it to fail over from a replica that hangs.
        limits: request limits to respect on top of those the servers advertise
            (``max_prime_chars``, ``max_chars_per_call``); the lower value wins.

    Example:

    >>> client = SamplingClient(["10.0.0.1:8500", "10.0.0.2:8500"], timeout=10)  # doctest: +SKIP
    >>> client.session("shakespeare", prime="ROMEO:", seed=1).generate(100)     # doctest: +SKIP
    """

    def __init__(
        self,
        targets: str | list[str],
        tls: TLS | None = None,
        timeout: float = 30.0,
        retries: int = 8,
        backoff: float = 0.05,
        down_time: float = 1.0,
        attempt_timeout: float | None = None,
        limits: dict[str, int] | None = None,
    ):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ConfigError("targets must hold at least one server address")
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive, got {timeout}")
        if retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        unknown = set(limits or {}) - set(LIMIT_NAMES)
        if unknown:
            raise ConfigError(f"limits: unknown limit(s) {sorted(unknown)}; known: {list(LIMIT_NAMES)}")
        if any(not (_is_int(v) and v > 0) for v in (limits or {}).values()):
            raise ConfigError(f"limits must be positive integers, got {limits}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.down_time, self.attempt_timeout, self.limits = down_time, attempt_timeout, dict(limits or {})
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Reconnect soon after a replica comes back (gRPC's default backoff grows to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._channels = [
            grpc.secure_channel(t, tls.credentials(), options) if tls else grpc.insecure_channel(t, options)
            for t in self.targets
        ]
        self._predict = [
            c.unary_unary(
                wire.PREDICT,
                request_serializer=wire.PredictRequest.SerializeToString,
                response_deserializer=wire.PredictResponse.FromString,
            )
            for c in self._channels
        ]
        self._metadata = [
            c.unary_unary(
                wire.GET_MODEL_METADATA,
                request_serializer=wire.GetModelMetadataRequest.SerializeToString,
                response_deserializer=wire.GetModelMetadataResponse.FromString,
            )
            for c in self._channels
        ]
        self._lock = threading.Lock()
        self.failed_attempts: Counter[str] = Counter()  # status code name -> attempts that failed (retried or not)
        self._next = 0  # round robin
        self._down_until = [0.0] * len(self.targets)  # monotonic time until which a replica is skipped
        self._failures = [0] * len(self.targets)  # consecutive UNAVAILABLE answers
        self._missing: dict[tuple, float] = {}  # (model, version, target index) -> until when it is asked last
        self._model_infos: OrderedDict[tuple[str, int], ModelInfo] = OrderedDict()  # (model, version) -> facts
        self._latest: dict[str, tuple[int, float]] = {}  # model -> (newest version seen answering, when)
        self._signature_names: dict[str, set[str]] = {}  # model -> its signatures (from model_info)
        self._without_xla: set[str] = set()  # models whose server answered "XLA compilation disabled"

    # ----- choosing a replica ----------------------------------------------------------------

    def _pick(self, exclude: set[int], key: tuple | None) -> int | None:
        """The next replica in turn among those not in ``exclude``: healthy ones first."""
        with self._lock:
            now = time.monotonic()
            candidates = [i for i in range(len(self.targets)) if i not in exclude]
            if not candidates:
                return None
            healthy = [i for i in candidates if self._down_until[i] <= now]
            has_it = [i for i in healthy if self._missing.get((*key, i), 0.0) <= now] if key else healthy
            pool = has_it or healthy or [min(candidates, key=lambda i: self._down_until[i])]
            start = self._next
            self._next = (self._next + 1) % len(self.targets)
            return min(pool, key=lambda i: (i - start) % len(self.targets))

    def _mark(self, index: int, code: grpc.StatusCode | None) -> None:
        with self._lock:
            if code is not None:
                self.failed_attempts[code.name] += 1
            if code == grpc.StatusCode.UNAVAILABLE:
                self._failures[index] += 1
                self._down_until[index] = time.monotonic() + self.down_time * 2 ** min(self._failures[index] - 1, 3)
            elif code is None:
                self._failures[index], self._down_until[index] = 0, 0.0

    def healthy_targets(self) -> list[str]:
        """The replicas not being skipped now (those that last answered, or whose skip time is over)."""
        with self._lock:
            now = time.monotonic()
            return [t for t, until in zip(self.targets, self._down_until) if until <= now]

    def _call(self, stubs, request, key: tuple | None = None):
        """One call, bounded by ``timeout``: round robin, failover, retries with backoff.

        ``key`` is ``(model, version)`` for a pinned version: replicas that lacked it lately are asked last.
        """
        deadline = time.monotonic() + self.timeout
        delay, attempts = self.backoff, 0
        not_found: set[int] = set()  # replicas that answered NOT_FOUND
        last: ServerError | None = None
        while True:
            index = self._pick(not_found, key)
            if index is None:  # every replica answered NOT_FOUND
                assert last is not None  # a replica is left out only once it has answered
                raise last
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer within the call's timeout of {self.timeout:g} s ({attempts} attempt(s)"
                    + (f"; last: {last.code}: {last.details}" if last else "")
                    + ")",
                    ", ".join(self.targets),
                )
            try:
                response = stubs[index](request, timeout=min(left, self.attempt_timeout or left))
            except grpc.RpcError as exc:
                code, attempts = exc.code(), attempts + 1
                last = ServerError(code, exc.details() or "", self.targets[index])
                self._mark(index, code)
                if code == grpc.StatusCode.NOT_FOUND:  # another replica may still have it
                    not_found.add(index)
                    if key:
                        with self._lock:
                            now = time.monotonic()
                            for stale in [k for k, until in self._missing.items() if until <= now]:
                                del self._missing[stale]
                            self._missing[(*key, index)] = now + NOT_FOUND_MEMORY
                    continue
                if code not in RETRYABLE or attempts > self.retries:
                    raise last from None
                if code == grpc.StatusCode.UNAVAILABLE and len(self.healthy_targets()) > len(not_found):
                    continue  # fail over at once: another replica is up
                time.sleep(max(0.0, min(delay * (0.5 + random.random()), deadline - time.monotonic())))
                delay *= 2
                continue
            self._mark(index, None)
            return response

    # ----- calls -----------------------------------------------------------------------------

    def predict(
        self, model: str, signature: str, inputs: dict[str, np.ndarray], version: int | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Calls Predict; returns the outputs as NumPy arrays and the version that answered.

        Args:
            model: the model's name.
            signature: the signature to run, e.g. ``"generate_text"``.
            inputs: its inputs by name.
            version: the version to call (None: the newest).

        Returns:
            The outputs and the version that answered.

        Raises:
            VersionGoneError: ``version`` is served by none of the replicas.
            ServerError: any other error status, after retries and failover.
        """
        request = wire.predict_request(model, signature, inputs, version)
        try:
            response = self._call(self._predict, request, None if version is None else (model, version))
        except ServerError as exc:
            raise version_gone(exc, model, version) from None
        answered = response.model_spec.version.value
        if version is None:
            self._note_latest(model, answered)
        outputs = {k: wire.from_tensor_proto(v) for k, v in response.outputs.items()}
        return outputs, answered

    def _note_latest(self, model: str, version: int) -> None:
        """Records the newest version seen answering, so model info follows a new version."""
        with self._lock:
            known = self._latest.get(model)
            if known is None or known[0] != version:
                self._latest[model] = (version, time.monotonic())

    def forget_latest(self, model: str, version: int) -> None:
        """Forgets that ``version`` is the newest of ``model`` (it is gone): the next model info asks again.

        Args:
            model: the model's name.
            version: the version found gone.
        """
        with self._lock:
            known = self._latest.get(model)
            if known is not None and known[0] == version:
                del self._latest[model]

    def predict_preferring_xla(
        self, model: str, signature: str, inputs: dict[str, np.ndarray], version: int | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Calls ``signature``'s XLA twin (``generate_text_xla``) when the model has one, else ``signature``.

        A server without XLA JIT (a stock ``tensorflow_model_server``) answers the twin
        INTERNAL "XLA compilation disabled": the call is then made on ``signature``, and
        this client calls the plain signature of that model from then on (it falls back once).
        Both give the same outputs.

        Args:
            model: the model's name.
            signature: a plain signature name, e.g. ``"generate_text"``.
            inputs: its inputs.
            version: the version to call (None: the newest).

        Returns:
            The outputs and the version that answered, as ``predict``.
        """
        twin = xla_twin(signature)
        if twin in self._signature_names.get(model, ()) and model not in self._without_xla:
            try:
                return self.predict(model, twin, inputs, version)
            except ServerError as exc:
                if not is_xla_unavailable(exc.details):
                    raise
                self._without_xla.add(model)
                log.warning(
                    "model %s: the server has no XLA JIT (%s); calling %s from now on", model, exc.details, signature
                )
        return self.predict(model, signature, inputs, version)

    def signature_defs(self, model: str, version: int | None = None) -> dict:
        """The model's SignatureDefs, from GetModelMetadata."""
        return self._fetch_metadata(model, version)[0]

    def _fetch_metadata(self, model: str, version: int | None) -> tuple[dict, int, dict]:
        """GetModelMetadata: (SignatureDefs by name, the version that answered, advertised limits)."""
        request = wire.GetModelMetadataRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        request.metadata_field.append("signature_def")
        try:
            response = self._call(self._metadata, request, None if version is None else (model, version))
        except ServerError as exc:
            raise version_gone(exc, model, version) from None
        sig_map = wire.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(sig_map):
            raise InputError(f"model {model!r}: the server's metadata holds no SignatureDefMap")
        return (
            dict(sig_map.signature_def),
            response.model_spec.version.value,
            model_metadata.advertised_limits(response),
        )

    def model_info(self, model: str, version: int | None = None) -> ModelInfo:
        """The facts a session needs of one version of ``model``: states, sizes and limits.

        Read from GetModelMetadata and the ``metadata`` signature of that version, and
        cached by version; the newest version is asked again when a call is answered
        by another version, or after ``LATEST_TTL`` seconds.

        Args:
            model: the model's name.
            version: the version (None: the newest).

        Returns:
            The model's info, with its ``version``; ``max_chars_per_call`` and
            ``limits`` take the servers' advertised limits and ``limits`` of this client into account.

        Raises:
            VersionGoneError: ``version`` is served by none of the replicas.
            InputError: the model is not a keras-charrnn model.
        """
        fetched = None
        if version is None:
            with self._lock:
                known = self._latest.get(model)
            if known and time.monotonic() - known[1] < LATEST_TTL:
                version = known[0]
            else:
                fetched = self._fetch_metadata(model, None)
                version = fetched[1]
                with self._lock:
                    self._latest[model] = (version, time.monotonic())
        with self._lock:
            info = self._model_infos.get((model, version))
        if info is not None:
            return info
        sigs, version, advertised = fetched or self._fetch_metadata(model, version)
        self._signature_names[model] = set(sigs)
        if "generate_text" not in sigs or "metadata" not in sigs:
            raise InputError(f"model {model!r} is not a keras-charrnn model (no generate_text/metadata signature)")
        outputs, _ = self.predict(model, "metadata", {}, version)
        info = model_metadata.model_info(model, version, sigs, outputs, advertised, self.limits)
        with self._lock:
            self._model_infos[(model, version)] = info
            while len(self._model_infos) > MAX_CACHED_INFOS:
                self._model_infos.popitem(last=False)
        return info

    def session(
        self,
        model: str,
        prime: str = DEFAULT_PRIME,
        params: SamplingParams | None = None,
        version: int | None = None,
        version_label: str | None = None,
        **fields,
    ) -> Session:
        """A session on ``model``, pinned to the version its model info comes from.

        Args:
            model: the model's name on the server.
            prime: the text to continue (at least one character).
            params: how characters are chosen; or give its fields as keywords
                (``temperature=``, ``top_k=``, ``top_p=``, ``seed=``).
            version: pin this version from the start (default: the newest the server has).
            version_label: pin the version this label of the server's config names now
                (e.g. ``"stable"``); it is resolved once, so moving the label later moves new
                sessions only.

        Returns:
            A new session; its calls go to the server.

        Example:

        >>> client.session("shakespeare", prime="ROMEO:", temperature=0.5, seed=1).generate(100)  # doctest: +SKIP
        """
        params = SamplingParams.of(params, **fields)
        if version_label is not None:
            version = self._label_version(model, version_label, version)
        return Session(
            _GrpcRunner(self, model, follow_newest=version is None), self.model_info(model, version), prime, params
        )

    def complete(
        self,
        model: str,
        prime: str,
        n: int,
        logprobs: int = LOGPROBS_OFF,
        params: SamplingParams | None = None,
        version: int | None = None,
        **fields,
    ) -> Completion:
        """Up to ``n`` characters after ``prime``, with why they ended and (if asked) their scores.

        The gRPC twin of ``keras_charrnn.CharRNN.complete``: a new session's ``complete``.

        Args:
            model: the model's name on the server.
            prime: the text to continue.
            n: the most characters to generate.
            logprobs: -1: no scores; 0: each character's log-probability; N: also N alternatives.
            params: as in ``session``, or its fields as keywords (``stop=``, ``min_chars=``, ``bias=``, ...).
            version: the version to call (default: the newest).

        Returns:
            The ``Completion`` (its ``session`` continues it).

        Raises:
            InputError: a feature needs ``generate_text_v2`` and the model lacks it (the message names it).

        Example:

        >>> client.complete("shakespeare", "ROMEO:", 200, stop="\\n\\n", seed=1).finish_reason  # doctest: +SKIP
        'stop'
        """
        session = self.session(model, prime, params, version=version, **fields)
        result = session.complete(n, logprobs)
        result.session = session
        return result

    def samples(
        self,
        model: str,
        prime: str,
        n: int,
        num_chars: int,
        logprobs: int = LOGPROBS_OFF,
        params: SamplingParams | None = None,
        version: int | None = None,
        **fields,
    ) -> list[Completion]:
        """``n`` samples after ``prime``, side by side as rows of the same calls (see ``Session.samples``).

        Sample i is a session seeded ``generation.sample_seed(seed, i)`` (sample 0: the session's own
        seed), reproducible alone; each continues as a session of its own (``.session``).

        Args:
            model: the model's name on the server.
            prime: the text to continue.
            n: how many samples (calls hold at most the server's ``max_rows_per_call`` rows).
            num_chars: the most characters of each.
            logprobs: as in ``complete``.
            params: as in ``session``, or its fields as keywords.
            version: the version to call (default: the newest).

        Returns:
            One ``Completion`` per sample, in order.

        Example:

        >>> [c.text for c in client.samples("shakespeare", "ROMEO:", 3, 80, seed=1, stop="\\n")]  # doctest: +SKIP
        """
        return self.session(model, prime, params, version=version, **fields).samples(n, num_chars, logprobs)

    def restore(self, saved: str) -> Session:
        """Continues a session saved with ``Session.to_json`` (possibly by another process).

        Args:
            saved: the JSON text from ``to_json``.

        Returns:
            The session, on the version it was pinned to.

        Raises:
            InputError: ``saved`` is not a valid saved session (the message names the field).
            VersionGoneError: its version is served by none of the replicas.
        """
        try:
            obj = json.loads(saved)
        except (ValueError, TypeError) as exc:
            raise InputError(f"not a saved session: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), str):
            raise InputError("not a saved session: no 'model' field naming the model")
        version = obj.get("version")
        if version is not None and not (_is_int(version) and version >= 1):
            raise InputError(
                f"saved session field 'version': must be a version number (1 or more) or null, got {version!r}"
            )
        model = obj["model"]
        if version is not None:
            self._fetch_metadata(model, version)  # still served somewhere? (the facts may be cached)
        return Session.from_json(
            saved, _GrpcRunner(self, model, follow_newest=version is None), self.model_info(model, version)
        )

    def _label_version(self, model: str, label: str, version: int | None = None) -> int:
        """The version a label of ``model`` names now (GetModelMetadata with ``version_label``).

        Raises:
            InputError: both ``version`` and ``label`` are given.
            ServerError: INVALID_ARGUMENT for a label the server does not know.
        """
        if version is not None:
            raise InputError(f"give version or version_label, not both (got {version} and {label!r})")
        request = wire.GetModelMetadataRequest()
        request.model_spec.name = model
        request.model_spec.version_label = label
        request.metadata_field.append("signature_def")
        return int(self._call(self._metadata, request).model_spec.version.value)

    def close(self) -> None:
        """Closes the client's gRPC channels; sessions of this client cannot call the server after it."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> SamplingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _GrpcRunner:
    """A session's ``Runner`` on the client.

    A session starts pinned to the version its model info came from. When its caller chose
    no version (``follow_newest``) and, before the session's first answer, that version is
    served by no replica any more (the newest version known to the client had been replaced),
    the call goes to the newest version instead: no state belongs to the old one yet.

    Args:
        client: the client.
        model: the model's name.
        follow_newest: whether the first call may move from a version gone to the newest.
    """

    def __init__(self, client: SamplingClient, model: str, follow_newest: bool = False):
        self.client, self.model, self.follow_newest = client, model, follow_newest

    def run(
        self, signature: str, inputs: dict[str, np.ndarray], version: int | None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Runs ``signature`` on ``version`` (see the class docstring for a version gone before the first answer)."""
        try:
            answer = self.client.predict_preferring_xla(self.model, signature, inputs, version)
        except VersionGoneError:
            if not self.follow_newest or version is None:
                raise
            self.client.forget_latest(self.model, version)
            answer = self.client.predict_preferring_xla(self.model, signature, inputs, None)
        self.follow_newest = False
        return answer

    def model_info(self, version: int | None) -> ModelInfo:
        """The facts of ``version`` of the model (see ``SamplingClient.model_info``)."""
        return self.client.model_info(self.model, version)

    def stream(
        self, signature: str, inputs: dict[str, np.ndarray], version: int | None, size: int
    ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Streams a generate call segment by segment (``stream_client.stream_predict``)."""
        self.follow_newest = False
        return stream_predict(self.client, self.model, signature, inputs, version, size)
