#!/usr/bin/env bash
# setup.sh — installs what nsa needs to build, run and test on Debian (12 or later):
# a C compiler and make, OpenBLAS (the dense products), and Debian's PyTorch and NumPy
# (used by the tests only, as an independent reference). Idempotent; uses sudo when not
# root. The CUDA toolkit is optional: when nvcc is on PATH, `make cuda` builds the GPU
# backend.
set -euo pipefail
packages=(build-essential libopenblas-dev python3-numpy python3-torch)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all packages present (${packages[*]})"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
echo "setup: done"
