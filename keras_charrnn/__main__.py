"""``python -m keras_charrnn``: the ``charrnn`` command (``python -m keras_charrnn --help``)."""

import sys

from keras_charrnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
