#!/usr/bin/env bash
# sieve's MobileNetV2 ImageNet weights in ONNX Runtime, the peer `sieve-tools bench forward
# --peer ort` compares sieve's forward with (issue #26). Makes a virtual environment in
# ops/.venv-peer (onnxruntime, onnx, numpy, Pillow from PyPI; no torch) unless it is there,
# fetches the weights if they are absent (ops/fetch-weights.sh), converts them to
# ops/weights/mobilenet_v2.onnx without network (ops/peer_ort.py: BatchNorm folded into the
# convolutions), and runs ops/peer_ort.py with the arguments given, from the repository
# root. Standalone: `bash ops/peer-ort.sh --threads 2 --seconds 3` prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=ops/.venv-peer
packages="onnxruntime==1.32.0 onnx==1.23.2 numpy==2.3.5 pillow==12.0.0"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import onnxruntime, onnx, numpy, PIL" 2>/dev/null; then
    echo "making $venv ($packages)" >&2
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # $packages is a word list on purpose
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $packages >&2
fi
bash ops/fetch-weights.sh >&2
exec "$venv/bin/python" ops/peer_ort.py "$@"
