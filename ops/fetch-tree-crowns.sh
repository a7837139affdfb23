#!/usr/bin/env bash
# Fetch real box annotations for the annotation-import tests into ops/tree-crowns/: DeepForest's
# sample tree-crown data, which its PyPI wheel ships under deepforest/data/. Four airborne RGB
# images have a Pascal VOC file each (951 crowns in all, label "Tree", or "Alive"/"Dead" in
# SOAP_061); the CSV files give some of the same boxes in deepforest's own layout
# (image_path,xmin,ymin,xmax,ymax,label). SOAP_031.png has no annotations; OSBS_029 comes as
# both .tif (the one its xml names) and .png. The wheel is pinned (pure Python, so any host
# picks the same file) and each file is checked against its SHA-256.
# Safe to run again: it skips files that are there.
set -euo pipefail
cd "$(dirname "$0")"

target=tree-crowns
files="2019_YELL_2_528000_4978000_image_crop2.png 2019_YELL_2_528000_4978000_image_crop2.xml
2019_YELL_2_541000_4977000_image_crop.png 2019_YELL_2_541000_4977000_image_crop.xml
OSBS_029.png OSBS_029.tif OSBS_029.xml OSBS_029.csv
SOAP_031.png SOAP_061.png SOAP_061.xml
example.csv testfile_deepforest.csv testfile_multi.csv"

missing=0
for file in $files; do
    [ -f "$target/$file" ] || missing=1
done
if [ "$missing" = 0 ]; then
    exit 0
fi

mkdir -p "$target"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching tree crowns (pip download deepforest)"
python3 -m pip download --quiet --no-deps --only-binary=:all: "deepforest==2.1.0" -d "$tmp"
# shellcheck disable=SC2086 # $files is a word list on purpose
python3 - "$tmp" "$tmp/crowns" $files <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
os.makedirs(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in sys.argv[3:]:
        with open(os.path.join(sys.argv[2], name), "wb") as f:
            f.write(z.read("deepforest/data/" + name))
PY
(
    cd "$tmp/crowns"
    sha256sum --quiet --check <<'SUMS'
a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767  2019_YELL_2_528000_4978000_image_crop2.png
bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11  2019_YELL_2_528000_4978000_image_crop2.xml
178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131  2019_YELL_2_541000_4977000_image_crop.png
cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631  2019_YELL_2_541000_4977000_image_crop.xml
d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee  OSBS_029.png
8521dbb5e8063d37d61895867dfcca7476491d1345103dc1b3fd96f71b186353  OSBS_029.tif
1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c  OSBS_029.xml
83ecd1fb6339eb0997c5a543300295fdd6e0d23c943f50429eb82d149905adba  OSBS_029.csv
506af051225465bd575e0e3ca0da1e6b8a269464d2144a0415829da78fcd1527  SOAP_031.png
256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424  SOAP_061.png
4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c  SOAP_061.xml
f3f93782f49bf126a84b014bd71aee9cc6358e36f203a0559c88bc98e4678d9c  example.csv
b555516a2db696813d853dd1c6991c6c021b5c09c8dcc87ef407dbcc20ca57c0  testfile_deepforest.csv
f334c424bb3ad6eaec7ef245b80e038e401875d18b13bc280200038075d215f5  testfile_multi.csv
SUMS
)
for file in $files; do
    cp "$tmp/crowns/$file" "$target/$file"
done
echo "tree crowns in ops/$target"
