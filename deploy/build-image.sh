#!/usr/bin/env bash
# Build the agent's image here, from a Debian base made with debootstrap and imported into podman: no
# registry is pulled from. Needs root, podman, runc and debootstrap (./setup.sh test installs them).
#
#   deploy/build-image.sh [IMAGE]      # default localhost/bpfscope-agent:latest
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
image=${1:-localhost/bpfscope-agent:latest}
base=localhost/bpfscope-base:bookworm
cache=${BPFSCOPE_IMAGE_CACHE:-/var/cache/bpfscope-image}
# podman on this kind of kernel: runc, cgroupfs, and no default ulimits (a private configuration).
mkdir -p "$cache"
printf '[containers]\ndefault_ulimits = []\n' > "$cache/containers.conf"
export CONTAINERS_CONF="$cache/containers.conf"
podman=(podman --runtime runc --cgroup-manager cgroupfs)

if ! "${podman[@]}" image exists "$base"; then
    if [ ! -f "$cache/rootfs.tar" ]; then
        rm -rf "$cache/rootfs"
        debootstrap --variant=minbase bookworm "$cache/rootfs" http://deb.debian.org/debian >/dev/null
        tar -C "$cache/rootfs" -cf "$cache/rootfs.tar.partial" .
        mv "$cache/rootfs.tar.partial" "$cache/rootfs.tar"
        rm -rf "$cache/rootfs"
    fi
    "${podman[@]}" import "$cache/rootfs.tar" "$base" >/dev/null
fi

# bpfscope's wheel (with the BPF objects compiled here) and its dependencies' wheels, fetched by the
# host's pip: the image build installs from them alone, with no index of its own to reach.
rm -rf dist
python3 -m pip wheel --disable-pip-version-check -q -w dist .
"${podman[@]}" build --network host --build-arg BASE="$base" -f deploy/Containerfile -t "$image" . >&2
echo "$image"
