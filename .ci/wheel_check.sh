#!/usr/bin/env bash
# CI: what a pip user gets. Builds the sdist and, from it, the wheel; installs the wheel into a fresh venv
# (with constraints.txt) and, from an empty temporary folder, runs the demo, samples the bundled model (the
# text must equal this clone's), imports the package and loads the bundled SavedModel with TensorFlow alone.
# Then installs the wheel without its dependencies beside only NumPy, gRPC and protobuf: the gRPC client
# must import there, with no TensorFlow installed.
#   .ci/wheel_check.sh            (from the repository root, or anywhere: it finds it)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say() { printf 'wheel check: %s\n' "$*"; }

say "building the sdist, then the wheel from it"
"$python" -m venv "$tmp/tools"
"$tmp/tools/bin/pip" install --quiet --no-compile -c "$root/constraints.txt" build
"$tmp/tools/bin/python" -m build --outdir "$tmp/dist" "$root" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
wheel="$(ls "$tmp"/dist/*.whl)"
size=$(stat -c %s "$wheel")
say "$(basename "$wheel"): $((size / 1024 / 1024)) MB"
[ "$size" -lt $((20 * 1024 * 1024)) ] || { say "the wheel is over 20 MB"; exit 1; }

say "installing it into a fresh venv"
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --no-compile -c "$root/constraints.txt" "$wheel"

mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"  # no saved_models/ here, no clone on the path
export TF_CPP_MIN_LOG_LEVEL=3
"$tmp/venv/bin/charrnn" --version
"$tmp/venv/bin/python" -m keras_charrnn --version
"$tmp/venv/bin/python" -c "import keras_charrnn; print('import keras_charrnn:', keras_charrnn.__file__)"
"$tmp/venv/bin/python" -c "
import sys
import keras_charrnn.serving.client
assert 'tensorflow' not in sys.modules, 'importing the gRPC client imported TensorFlow'
import tensorflow as tf
import keras_charrnn
path = keras_charrnn.bundled_model_path()
assert str(path).startswith(sys.prefix), path  # the installed copy, not a clone's
loaded = tf.saved_model.load(str(path))
print('bundled model:', path, sorted(loaded.signatures)[:3], '...')
"
say "charrnn demo"
"$tmp/venv/bin/charrnn" demo --calls 2 --chunk 40
say "charrnn sample -n 50 --seed 1, installed and in the clone"
installed="$("$tmp/venv/bin/charrnn" sample -n 50 --seed 1)"
clone="$(cd "$root" && PYTHONPATH="$root" "$python" -m keras_charrnn sample -n 50 --seed 1)"
if [ "$installed" != "$clone" ]; then
  say "the installed wheel samples other text than the clone"
  printf 'installed: %q\nclone:     %q\n' "$installed" "$clone"
  exit 1
fi
say "same text: $(printf %q "$installed")"

say "the gRPC client without TensorFlow installed"
"$python" -m venv "$tmp/client"
"$tmp/client/bin/pip" install --quiet --no-compile -c "$root/constraints.txt" numpy grpcio protobuf
"$tmp/client/bin/pip" install --quiet --no-deps "$wheel"
"$tmp/client/bin/python" -c "
import importlib.util
assert importlib.util.find_spec('tensorflow') is None
from keras_charrnn.serving.client import SamplingClient
import keras_charrnn
print('client imported without TensorFlow:', SamplingClient.__name__, keras_charrnn.__version__)
"
say "passed"
