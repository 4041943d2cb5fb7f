"""The OpenAI-compatible routes of the REST port: ``GET /v1/models`` and ``POST /v1/completions``.

For tools that speak the OpenAI API (its client libraries, LangChain, curl scripts): a
token is a character. ``GET /v1/models`` lists every model as ``NAME`` (its newest
version), ``NAME/VERSION`` and ``NAME@LABEL``; ``GET /v1/models/{id}/vocabulary`` lists its
characters in id order (the keys of ``logit_bias``). ``POST /v1/completions`` takes that
API's body (see ``openai_schema``) and answers ``text_completion`` objects, or with
``stream: true`` Server-Sent Events (``data: {...}`` chunks, then ``data: [DONE]``).
``/v1/chat/completions`` is refused: a character model has no chat template.

The API is stateless: each call primes every row from a zero state, so a prompt and a
seed give the same text every time, the text of the package's own session
(``keras_charrnn.load(path).session(prompt, seed=..., temperature=..., top_p=...,
stop=...).generate(max_tokens)``); choice ``i`` of ``n`` takes the seed
``generation.sample_seed(seed, i)`` (``Session.samples``). The ``n`` choices of every
prompt are rows of the same ``generate_text_v2`` calls, made through
``PredictionServicer.predict_arrays``: the gRPC path's limits, checks and batching.
The generation runs in segments of ``SEGMENT_CHARS`` characters, carried from one to the
next by ``generation.continue_rows``; a stream sends each segment's characters as it
comes (holding back, while a row runs, the characters that could be the start of a stop
string). ``echo`` with ``logprobs`` scores the prompt with the ``step`` signature.
Metrics count these calls under the entrypoint ``OPENAI``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote

from keras_charrnn.errors import ServingError
from keras_charrnn.serving import monitoring
from keras_charrnn.serving.json_codec import parse_json
from keras_charrnn.serving.openai_generation import SIGNATURE, Generation, Scores, Start, model_facts, model_spec
from keras_charrnn.serving.openai_schema import ApiError, CompletionRequest, choice_record, parse_model_id
from keras_charrnn.serving.rest import HTTP_STATUS, Reply
from keras_charrnn.serving.servicers import PredictionServicer, SettingNamer, error_text
from keras_charrnn.serving.version_loader import LoadedVersion

__all__ = ["ENTRYPOINT", "OpenAIApi"]

log = logging.getLogger("charrnn.serve")

ENTRYPOINT = "OPENAI"  # the metrics' entrypoint label of these routes
OWNER = "charrnn"
VOCABULARY_PATH = re.compile(r"/v1/models/(.+)/vocabulary")
PARAM_OF_SETTING = {
    "max_prime_chars": "prompt",
    "max_ids_length": "prompt",
    "max_rows_per_call": "n",
    "max_request_elements": "n",
    "max_chars_per_call": "max_tokens",
}


def _sse(document: Any) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _joined(first: Scores | None, second: Scores | None) -> Scores | None:
    """Two (values, alternatives) score pairs one after the other."""
    if first is None or second is None:
        return second if first is None else first
    tops = None if first[1] is None or second[1] is None else [*first[1], *second[1]]
    return [*first[0], *second[0]], tops


# ----- the routes ---------------------------------------------------------------------------


class OpenAIApi:
    """The OpenAI-compatible routes over the gRPC service's ``predict_arrays``.

    Args:
        prediction: the ``PredictionServicer`` (its manager, limits and ``predict_arrays``).
        timeout_s: the longest one completion may take (``rest_api_timeout_in_ms``; None: no limit).
        name_setting: how the server's operator sets a setting, added to the errors a setting causes.
        continuations: signs and reads continuation tokens (``continuation.Continuations``; None: none offered).

    Example:

    >>> rest = RestServer(RestApi(prediction, status), extra_routes=OpenAIApi(prediction).handle)  # doctest: +SKIP
    """

    def __init__(
        self,
        prediction: PredictionServicer,
        timeout_s: float | None = None,
        name_setting: SettingNamer | None = None,
        continuations: Any = None,
    ):
        self.prediction, self.timeout_s, self.name_setting = prediction, timeout_s, name_setting
        self.continuations = continuations

    def handle(self, method: str, path: str, body: bytes) -> Reply | None:
        """Answers an OpenAI route; None for any other path (the REST API's then).

        Args:
            method: the HTTP method.
            path: the URL path.
            body: the request body.

        Returns:
            The reply (errors in that API's shape), or None.
        """
        note = {"model": ""}  # the model a completion names, for the metrics
        routes: dict[str, tuple[str, Callable[[], Reply]]] = {
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", lambda: self._completions(body, note)),
            "/v1/chat/completions": ("POST", self._chat),
        }
        match = VOCABULARY_PATH.fullmatch(path)
        if path in routes:
            allowed, answer = routes[path]
        elif match is not None:
            allowed, answer = "GET", lambda: self._vocabulary(unquote(match.group(1)))
        else:
            return None
        api = path.rsplit("/", 1)[-1]
        start, status = time.perf_counter(), "INTERNAL"
        try:
            if method != allowed and not (allowed == "GET" and method == "HEAD"):
                raise ApiError(405, f"{path} takes {allowed}, not {method}", None, "method_not_allowed")
            reply = answer()
            if reply.chunks is not None:  # a stream counts itself once it ends
                reply.chunks = self._counted(reply.chunks, note["model"], api, start)
                status = ""
                return reply
            status = "OK"
            return reply
        except ServingError as exc:
            error = self._api_error(exc)
            status = error.grpc_code
            return self._error_reply(error)
        except ApiError as exc:
            status = exc.grpc_code
            return self._error_reply(exc)
        except Exception as exc:  # never a traceback to the caller
            log.exception("internal error in OpenAI %s %s", method, path)
            return self._error_reply(ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
            if status:
                monitoring.record_request(note["model"], api, ENTRYPOINT, status, time.perf_counter() - start)

    def _counted(self, chunks: Iterable[bytes], model: str, api: str, start: float) -> Iterator[bytes]:
        status = "CANCELLED"
        try:
            yield from chunks
            status = "OK"
        finally:
            monitoring.record_request(model, api, ENTRYPOINT, status, time.perf_counter() - start)

    def _api_error(self, exc: ServingError) -> ApiError:
        """A ``ServingError`` in that API's terms (a request too large for a limit is a 400, not a 429)."""
        status = HTTP_STATUS.get(exc.code, 500)
        if exc.code == "RESOURCE_EXHAUSTED" and exc.setting != "max_concurrent_requests":
            status = 400
        param = PARAM_OF_SETTING.get(exc.setting or "")
        code = "model_not_found" if status == 404 else "limit_exceeded" if exc.setting else None
        return ApiError(status, error_text(exc, self.name_setting), param, code, exc.code)

    @staticmethod
    def _error_reply(error: ApiError) -> Reply:
        return Reply(error.status, "application/json", json.dumps(error.document()).encode("utf-8") + b"\n")

    @staticmethod
    def _json(document: Any) -> Reply:
        return Reply(200, "application/json", json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n")

    def _resolve(self, model: str) -> LoadedVersion:
        name, version, label = parse_model_id(model)
        try:
            return self.prediction.manager.resolve(name, version, label)
        except ServingError as exc:
            raise ApiError(
                404, f"The model {model!r} does not exist: {exc.message}", "model", "model_not_found"
            ) from None

    def _models(self) -> Reply:
        manager, data = self.prediction.manager, []
        for name in sorted(manager.models):
            loaded = dict(manager.models[name].loaded)
            if not loaded:
                continue
            ids = [(name, max(loaded))] + [(f"{name}/{v}", v) for v in sorted(loaded)]
            ids += [(f"{name}@{label}", v) for label, v in sorted(manager.labels(name).items()) if v in loaded]
            for model_id, version in ids:
                try:
                    created = int(loaded[version].path.stat().st_mtime)
                except OSError:
                    created = 0
                data.append(
                    {"id": model_id, "object": "model", "created": created, "owned_by": OWNER, "version": version}
                )
        return self._json({"object": "list", "data": data})

    def _vocabulary(self, model: str) -> Reply:
        loaded = self._resolve(model)
        tokens = list(model_facts(loaded).vocabulary)
        return self._json({"object": "vocabulary", "model": model, "version": loaded.version, "tokens": tokens})

    def _chat(self) -> Reply:
        raise ApiError(
            400,
            "chat completions are not supported: a character model has no chat template; use POST /v1/completions "
            "with the conversation as the prompt",
            None,
            "unsupported_endpoint",
        )

    def _completions(self, body: bytes, note: dict[str, str]) -> Reply:
        try:
            document = parse_json(body)
        except ServingError as exc:
            raise ApiError(400, exc.message, None, "invalid_json") from None
        request = CompletionRequest.parse(document, self.prediction.limits)
        if request.user is not None:
            log.info("completion for user %r: model %s, %d row(s)", request.user[:64], request.model, request.rows)
        start = Start()
        if request.continuation is not None:
            if self.continuations is None:
                raise ApiError(400, "this server offers no continuation tokens", "continuation", "unsupported")
            start = self.continuations.start(request)
        loaded = self._resolve(start.model or request.model)
        note["model"] = loaded.name
        try:
            call = self.prediction.signature_call(model_spec(loaded.name, loaded.version), SIGNATURE)
        except ServingError as exc:
            if exc.code != "FAILED_PRECONDITION":
                raise
            raise ApiError(
                400,
                f"model {loaded.name} version {loaded.version} has no '{SIGNATURE}' signature (exported before "
                f"keras-charrnn 0.3); re-export it with keras_charrnn.reexport.reexport_savedmodel",
                "model",
                "model_not_supported",
            ) from None
        generation = Generation(self.prediction, request, call, start, self.timeout_s)
        scores = generation.prompt_scores()
        head = {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": f"{loaded.name}/{loaded.version}",
        }
        segments = generation.segments()
        if not request.stream:
            for _ in segments:
                pass
            return self._json({**head, "choices": self._choices(generation, scores), "usage": generation.usage()})
        first = next(segments, None)  # a failing first call still answers with an HTTP error
        chunks = self._stream(generation, scores, head, segments, first is not None)
        return Reply(200, "text/event-stream", b"", chunks=chunks)

    def _choices(self, generation: Generation, scores: list[Scores | None]) -> list[dict[str, Any]]:
        choices = []
        for row in range(generation.request.rows):
            prompt, echo = generation.prompt(row), generation.request.echo
            text, own = generation.visible(row)
            if echo:
                text, own = prompt + text, _joined(scores[row // generation.request.n], own)
            choice = choice_record(row, text, own, 0 if echo else len(prompt), generation.acc[row].finish_reason)
            self._offer_continuation(generation, row, choice)
            choices.append(choice)
        return choices

    def _offer_continuation(self, generation: Generation, row: int, choice: dict[str, Any]) -> None:
        if self.continuations is not None:
            choice["continuation"] = self.continuations.token(generation, row)

    def _stream(
        self, generation: Generation, scores: list[Scores | None], head: dict, segments: Iterator, ran: bool
    ) -> Iterator[bytes]:
        """The SSE stream: the echoed prompts, each segment's new characters, each row's finish, the usage."""
        request, rows = generation.request, generation.request.rows
        sent, closed = [0] * rows, [False] * rows
        if request.echo:
            yield _sse({**head, "choices": [
                choice_record(r, generation.prompt(r), scores[r // request.n], 0, None) for r in range(rows)
            ]})  # fmt: skip

        def pieces(moved: list[int]) -> list[dict]:
            out = []
            for row in moved:
                text, own = generation.visible(row)
                done = generation.finished(row)
                if len(text) == sent[row] and not done:
                    continue
                part = None if own is None else (own[0][sent[row] :], None if own[1] is None else own[1][sent[row] :])
                offset = len(generation.prompt(row)) + sent[row]
                choice = choice_record(
                    row, text[sent[row] :], part, offset, generation.acc[row].finish_reason if done else None
                )
                if done:
                    self._offer_continuation(generation, row, choice)
                out.append(choice)
                sent[row], closed[row] = len(text), done
            return out

        try:
            if ran:
                yield _sse({**head, "choices": pieces(list(range(rows)))})
                for moved in segments:
                    yield _sse({**head, "choices": pieces(moved)})
            last = pieces([r for r in range(rows) if not closed[r]])
            if last:
                yield _sse({**head, "choices": last})
        except ServingError as exc:
            yield _sse(self._api_error(exc).document())
            return
        except Exception as exc:
            log.exception("internal error in a streamed completion")
            yield _sse(ApiError(500, f"internal error: {type(exc).__name__}").document())
            return
        if request.include_usage:
            yield _sse({**head, "choices": [], "usage": generation.usage()})
        yield b"data: [DONE]\n\n"
