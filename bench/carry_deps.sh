#!/usr/bin/env bash
# carry_deps.sh — on a Debian machine with libopenblas-dev (./setup.sh), copy OpenBLAS's
# header and library, and the runtime libraries it needs, into .deps/ (git-ignored here),
# for a GPU machine that has no OpenBLAS: bench/run_gpu.sh builds and runs against .deps/
# when the system has no cblas.h. Pass .deps to the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=/usr/include/x86_64-linux-gnu/openblas-pthread
lib=/usr/lib/x86_64-linux-gnu/openblas-pthread
so=$(ls "$lib"/libopenblasp-r*.so 2>/dev/null | head -n 1 || true)
if [ ! -f "$inc/cblas.h" ] || [ -z "$so" ]; then
    echo "carry_deps: no OpenBLAS under $inc and $lib (run ./setup.sh first)" >&2
    exit 1
fi
rm -rf .deps.tmp
mkdir -p .deps.tmp/include .deps.tmp/lib
cp -L "$inc/cblas.h" "$inc/openblas_config.h" .deps.tmp/include/
cp -L "$so" .deps.tmp/lib/libopenblas.so.0
ln -s libopenblas.so.0 .deps.tmp/lib/libopenblas.so
for dep in libgfortran.so.5 libquadmath.so.0; do
    cp -L "/lib/x86_64-linux-gnu/$dep" .deps.tmp/lib/
done
rm -rf .deps
mv .deps.tmp .deps
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo /.deps/ >>.git/info/exclude
echo "carry_deps: .deps/ ready ($(du -sh .deps | cut -f1))"
