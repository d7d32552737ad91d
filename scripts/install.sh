#!/usr/bin/env bash
# Install everything the node needs on a fresh Debian/Ubuntu machine (run as root).
#
#   bash scripts/install.sh          # runtime: Python venv in .venv, DCMTK
#   bash scripts/install.sh --test   # + test peers (dicom3tools, Orthanc) and test tools
#
# Idempotent: system packages already present are not reinstalled, the venv is
# reused, and pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

pkgs=(python3 python3-venv python3-dev gcc dcmtk)
if [ "$TEST" = 1 ]; then
  pkgs+=(dicom3tools orthanc)
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
if [ "$TEST" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
echo "installed: $(.venv/bin/dicom-node --version)"
