"""The package's one exception type for problems a user can fix."""


class CharRNNError(Exception):
    """A problem with the user's input (a file, a flag, an argument).

    The CLI prints its message as one line and exits non-zero; the Python API
    lets it propagate. Its message always names the problem.
    """


def graph_error_message(text: str) -> str:
    """The user-facing part of a TensorFlow error raised by a model's own input checks.

    ``tf.debugging`` assertions fail with a long "Graph execution error"
    report; the sentence the model wrote stands inside ``assertion failed: [...]``.
    """
    marker = "assertion failed: ["
    if marker in text:
        start = text.index(marker) + len(marker)
        end = text.find("]", start)
        return text[start:end if end > 0 else None]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Graph execution error", "Detected at node"))]
    return (useful or lines or ["model error"])[-1]
