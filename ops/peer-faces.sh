#!/usr/bin/env bash
# MTCNN's weights (facenet-pytorch's, as sieve's face detector loads them) in ONNX Runtime: the
# peer `sieve-tools bench forward --task deidentify --peer ort` compares sieve's face committee
# with (issue #24). Uses ops/peer-ort.sh's virtual environment (ops/.venv-peer: onnxruntime,
# onnx, numpy, Pillow; no torch), made if it is absent, fetches the weights and photos if they
# are absent, and runs ops/peer_faces.py with the arguments given, from the repository root.
# Standalone: `bash ops/peer-faces.sh --threads 2 --seconds 3` prints a JSON line per photo.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=ops/.venv-peer
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import onnxruntime, onnx, numpy, PIL" 2>/dev/null; then
    # ops/peer-ort.sh makes it (with its pinned packages) before anything else.
    bash ops/peer-ort.sh --help >/dev/null
fi
bash ops/fetch-face-weights.sh >&2
bash ops/fetch-test-photos.sh >&2
exec "$venv/bin/python" ops/peer_faces.py "$@"
