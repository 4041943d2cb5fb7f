"""The package's one exception type for problems a user can fix."""


class CharRNNError(Exception):
    """A problem with the user's input (a file, a flag, an argument).

    The CLI prints its message as one line and exits non-zero; the Python API
    lets it propagate. Its message always names the problem.
    """
