#!/usr/bin/env bash
# Fetch a few real photos for the MobileNetV2 import test (worker/tests/it/mobilenet_import.rs)
# and the de-identification scenes (tools/src/scenes.rs) into ops/test-photos/. They are
# scikit-image's sample images, which its PyPI wheel ships under skimage/data/: a cat
# (chelsea.png), a cup of coffee (coffee.png), a rocket on its launch pad (rocket.jpg), an
# astronaut (astronaut.png), a motorcycle (motorcycle_left.png), and 200 crops of Labeled
# Faces in the Wild, 100 of them faces (lfw_subset.npy). The wheel is pinned (version and
# platform, so any host picks the same file) and each photo is checked against its SHA-256.
# Safe to run again: it skips photos that are there.
set -euo pipefail
cd "$(dirname "$0")"

target=test-photos
photos="chelsea.png coffee.png rocket.jpg astronaut.png motorcycle_left.png lfw_subset.npy"

missing=0
for photo in $photos; do
    [ -f "$target/$photo" ] || missing=1
done
if [ "$missing" = 0 ]; then
    exit 0
fi

mkdir -p "$target"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching test photos (pip download scikit-image)"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
    "scikit-image==0.22.0" -d "$tmp"
# shellcheck disable=SC2086 # $photos is a word list on purpose
python3 - "$tmp" "$tmp/photos" $photos <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
os.makedirs(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for photo in sys.argv[3:]:
        with open(os.path.join(sys.argv[2], photo), "wb") as f:
            f.write(z.read("skimage/data/" + photo))
PY
(
    cd "$tmp/photos"
    sha256sum --quiet --check <<'SUMS'
596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb  chelsea.png
cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7  coffee.png
c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c  rocket.jpg
88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5  astronaut.png
db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179  motorcycle_left.png
9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c  lfw_subset.npy
SUMS
)
for photo in $photos; do
    cp "$tmp/photos/$photo" "$target/$photo"
done
echo "photos in ops/$target"
