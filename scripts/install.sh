#!/usr/bin/env bash
# Install everything the node needs on a fresh Debian/Ubuntu machine (run as root).
#
#   bash scripts/install.sh          # runtime: Python venv in .venv with the AI backends, DCMTK
#   bash scripts/install.sh --test   # + test peers (dicom3tools, Orthanc and its DICOMweb plugin,
#                                    #   Chromium for the OHIF viewer test) and test tools
#   bash scripts/install.sh --no-ai  # without TotalSegmentator/nnU-Net/MONAI (HU backend only)
#   bash scripts/install.sh --postgres  # + psycopg, for a job store on PostgreSQL (docs/scaling.md)
#   bash scripts/install.sh --no-dask  # without Dask distributed (executor kind dask, docs/scaling.md)
#
# The AI extras are installed against constraints.txt, which pins torch==2.13.0
# (the CPU build is installed first): without it nnunetv2 -> timm -> torchvision
# would replace it with a multi-GB CUDA build.  See docs/ai-backends.md.
#
# Idempotent: system packages already present are not reinstalled, the venv is
# reused, and pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
AI=1
PG=0
DASK=1
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --no-ai) AI=0 ;;
    --postgres) PG=1 ;;
    --no-dask) DASK=0 ;;
    *) echo "usage: $0 [--test] [--no-ai] [--postgres] [--no-dask]" >&2; exit 2 ;;
  esac
done

pkgs=(python3 python3-venv python3-dev gcc dcmtk)
if [ "$TEST" = 1 ]; then
  pkgs+=(dicom3tools orthanc orthanc-dicomweb chromium openssl dcm2niix)  # openssl: the test PKI of tests/test_tls.py
  pkgs+=(postgresql)  # initdb/pg_ctl: the tests start a throwaway PostgreSQL cluster (tests/pg_helpers.py)
  # npm fetches OHIF's published build for the viewer test (Debian's npm, unless a nodejs
  # package that bundles it is installed already)
  command -v npm >/dev/null 2>&1 || pkgs+=(npm)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Orthanc's postinst tries to start a system service; without systemd that is harmless
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=()
[ "$TEST" = 1 ] && extras+=(test)
[ "$PG" = 1 ] && extras+=(postgres)
[ "$DASK" = 1 ] && extras+=(dask)
if [ "$AI" = 1 ]; then
  extras+=(ai)
  .venv/bin/python -m pip install -q torch==2.13.0
fi
spec="."
if [ "${#extras[@]}" -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
.venv/bin/python -m pip install -q -e "$spec" -c constraints.txt
echo "installed: $(.venv/bin/dicom-node --version)"
