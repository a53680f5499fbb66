#!/usr/bin/env bash
# Prepare a machine for the MMNet pipeline: Python packages, pretrained weights, the BreakHis data, a GPU check.
# Safe to rerun.
set -uo pipefail

OFFICIAL_URL="http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
EXPECTED_IMAGES=7909
URL="${BREAKHIS_URL:-$OFFICIAL_URL}"
TARBALL="${BREAKHIS_TARBALL:-}"
DEST="${BREAKHIS_DEST:-data}"
DATA_DIR=""
INSTALL=1
GET_DATA=1
GET_WEIGHTS=1
GPU_INFO=1
ASKED=0
CHECK_TORCH=0
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

usage() {
    cat <<EOF
Usage: bash setup.sh [options]

Installs the Python packages, caches the pretrained weights of the default run's backbones, downloads and extracts
BreakHis into data/, prints torch/CUDA facts.
Rerunning is safe: packages already present are kept, existing data is never deleted or re-downloaded.

Options:
  --skip-install     do not install Python packages
  --skip-data        do not download or check the dataset
  --skip-weights     do not fetch the pretrained backbone weights (python -m backbones.fetch [BACKBONE ...])
  --url URL          download BreakHis from URL (default: \$BREAKHIS_URL or $OFFICIAL_URL)
  --tarball FILE     extract a local BreaKHis_v1.tar.gz instead of downloading (env: BREAKHIS_TARBALL)
  --data-dir DIR     use an already extracted copy at DIR: only count its images
  --skip-gpu-info    do not print the torch/CUDA/GPU facts
  --check-torch      only say whether the installed torch/torchvision are in the tested range, then exit
  --dest DIR         where the data goes (default: data, env: BREAKHIS_DEST); the tarball extracts to DIR/BreaKHis_v1
  -h, --help         show this help

Packages: requirements.lock (every package pinned) on a plain machine; requirements.runpod (the same pins, keeps
the preinstalled torch, warns when its version is outside the tested range) when torch with CUDA already works.
A failed package install exits non-zero. A failed download says so and exits 0, unless the data was asked for
explicitly (--url, --tarball, --data-dir), then it exits 1. Weights that cannot be fetched (offline) only warn:
python main.py then needs the network at its first model, or --pretrained-path FILE, or --no-pretrained.
Without the data, try the whole pipeline on synthetic images: python main.py --demo
EOF
}

say() { echo "[setup] $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --skip-install) INSTALL=0 ;;
        --skip-data) GET_DATA=0 ;;
        --skip-weights) GET_WEIGHTS=0 ;;
        --skip-gpu-info) GPU_INFO=0 ;;
        --check-torch) CHECK_TORCH=1 ;;
        --url) URL="${2:?--url needs a value}"; ASKED=1; shift ;;
        --tarball) TARBALL="${2:?--tarball needs a value}"; ASKED=1; shift ;;
        --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; ASKED=1; shift ;;
        --dest) DEST="${2:?--dest needs a value}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

absolute() { case "$1" in ""|/*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
TARBALL=$(absolute "$TARBALL")
DATA_DIR=$(absolute "$DATA_DIR")
[ "$DEST" = data ] || DEST=$(absolute "$DEST")
cd "$(dirname "$0")" || exit 1

TESTED_TORCH="${SETUP_TESTED_TORCH:-2.14}"    # the torch and torchvision series the suite passed with (the lock)
TESTED_VISION="${SETUP_TESTED_VISION:-0.29}"

torch_range() {
    "$PYTHON" - "$TESTED_TORCH" "$TESTED_VISION" <<'EOF' || true
import sys
import torch, torchvision
def series(v): return ".".join(v.split("+")[0].split(".")[:2])
found = {"torch": torch.__version__, "torchvision": torchvision.__version__}
for (name, version), tested in zip(found.items(), sys.argv[1:]):
    if series(version) != tested:
        print(f"[setup] WARNING: the image's {name} {version} is outside the tested range {tested}.x; "
              f"continuing with it. If something fails, check with: python -m pytest -q tests")
EOF
}

install_packages() {
    local file=requirements.lock
    if "$PYTHON" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        file=requirements.runpod
        say "torch with CUDA already works: installing $file (every package pinned; keeps the image's torch/torchvision)"
        torch_range
    else
        say "installing $file (every package pinned)"
    fi
    "$PYTHON" -m pip install -r "$file" || { say "ERROR: pip install -r $file failed"; return 1; }
}

count_images() {
    find -L "$1" -type f -iname 'SOB_*.png' 2>/dev/null | wc -l | tr -d ' '
}

report_count() {
    local n
    n=$(count_images "$1")
    if [ "$n" -eq "$EXPECTED_IMAGES" ]; then
        say "found $n images under $1 (the full BreakHis v1)"
    else
        say "WARNING: found $n images under $1; BreakHis v1 has $EXPECTED_IMAGES"
    fi
    [ "$n" -gt 0 ]
}

download() {
    local out="$1"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --progress-bar --retry 2 --connect-timeout 20 -o "$out" "$URL"
        return
    fi
    if command -v wget >/dev/null 2>&1; then
        wget -q --tries=2 --timeout=20 -O "$out" "$URL"
        return
    fi
    "$PYTHON" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$URL" "$out"
}

offline() {
    say "could not get BreakHis: $1"
    say "Without network: copy BreaKHis_v1.tar.gz here and run 'bash setup.sh --tarball BreaKHis_v1.tar.gz',"
    say "or try the whole pipeline on synthetic images: python main.py --demo"
    [ "$ASKED" -eq 1 ] && return 1
    return 0
}

extract() {
    local tarball="$1" tmp
    tmp=$(mktemp -d "$DEST/.extract.XXXXXX") || return 1
    say "extracting $tarball into $DEST/"
    if ! tar -xzf "$tarball" -C "$tmp"; then
        rm -rf "$tmp"
        say "ERROR: $tarball is not a readable .tar.gz"
        return 1
    fi
    if [ -d "$tmp/BreaKHis_v1" ]; then
        mv "$tmp/BreaKHis_v1" "$DEST/BreaKHis_v1"
    elif find "$tmp" -type d -name histology_slides | grep -q .; then
        mv "$tmp" "$DEST/BreaKHis_v1"
    else
        rm -rf "$tmp"
        say "ERROR: $tarball holds no histology_slides folder"
        return 1
    fi
    rm -rf "$tmp"
}

get_data() {
    if [ -n "$DATA_DIR" ]; then
        [ -d "$DATA_DIR" ] || { say "ERROR: --data-dir $DATA_DIR does not exist"; return 1; }
        report_count "$DATA_DIR" || { say "ERROR: no BreakHis images under $DATA_DIR"; return 1; }
        say "run the pipeline on it with: python main.py --data-root $DATA_DIR"
        return 0
    fi
    mkdir -p "$DEST" || return 1
    if [ -d "$DEST/BreaKHis_v1" ]; then
        say "$DEST/BreaKHis_v1 already exists: skipping the download"
        report_count "$DEST/BreaKHis_v1"
        return 0
    fi
    if [ -z "$TARBALL" ]; then
        TARBALL="$DEST/BreaKHis_v1.tar.gz"
        if [ ! -s "$TARBALL" ]; then
            say "downloading $URL"
            if ! download "$TARBALL.part"; then
                rm -f "$TARBALL.part"
                offline "download from $URL failed (offline?)"
                return
            fi
            mv "$TARBALL.part" "$TARBALL"
        fi
    fi
    [ -f "$TARBALL" ] || { offline "tarball $TARBALL not found"; return; }
    extract "$TARBALL" || return 1
    report_count "$DEST/BreaKHis_v1"
    say "data ready: python main.py (data root: $DEST)"
}

get_weights() {
    say "caching the pretrained weights of the default backbones (timm / Hugging Face hub caches)"
    "$PYTHON" -m backbones.fetch && return 0
    say "WARNING: some pretrained weights are not cached (see above); setup goes on"
}

gpu_facts() {
    "$PYTHON" - <<'EOF' 2>/dev/null || say "torch is not importable yet"
import torch
cuda = torch.cuda.is_available()
print(f"[setup] torch {torch.__version__} | CUDA build {torch.version.cuda} | CUDA available {cuda}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"[setup] GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF
}

if [ "$CHECK_TORCH" -eq 1 ]; then
    torch_range
    say "tested range: torch $TESTED_TORCH.x, torchvision $TESTED_VISION.x"
    exit 0
fi
status=0
mkdir -p output/logs
if [ "$INSTALL" -eq 1 ]; then
    install_packages || exit 1
fi
[ "$GET_WEIGHTS" -eq 1 ] && get_weights
if [ "$GET_DATA" -eq 1 ]; then
    get_data || status=1
fi
[ "$GPU_INFO" -eq 1 ] && gpu_facts
exit $status
