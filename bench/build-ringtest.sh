#!/usr/bin/env bash
# Build the Linux kernel's tools/virtio/ringtest binaries (the baseline of
# `pyvirtio bench --ringtest PATH`) from Debian's linux-source package, cached under
# .cache/ringtest/ (ignored by git). The project ships no kernel code: this fetches it.
#
#   bench/build-ringtest.sh            # prints the path of virtio_ring_0_9
#   pyvirtio bench --only pingpong --ringtest "$(bench/build-ringtest.sh)"
#
# Needs apt-get (for `apt-get download`, no root needed), xz, make and gcc.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=$(apt-cache depends linux-source 2>/dev/null | awk '/Depends: linux-source-/ {print $2; exit}')
pkg=${pkg:-linux-source-6.1}
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "no $pkg in the apt sources" >&2; exit 1; }
out=".cache/ringtest/$pkg-$ver"
bin="$out/tools/virtio/ringtest/virtio_ring_0_9"
if [ ! -x "$bin" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq "$pkg=$ver" >&2)
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    mkdir -p "$out"
    # only what the ring benchmarks include
    tar -xJf "$tmp/x/usr/src/$pkg.tar.xz" -C "$out" --strip-components=1 --wildcards \
        "$pkg/tools/virtio/ringtest/*" "$pkg/tools/include/*" "$pkg/tools/arch/x86/include/*"
    make -s -C "$out/tools/virtio/ringtest" ring virtio_ring_0_9 virtio_ring_poll >&2
fi
realpath "$bin"
