#!/bin/sh
# Build a local stand-in for the official Python slim image when no image registry is
# reachable: a Debian bookworm minbase (debootstrap) with Debian's python3, imported into
# podman as $1 (default localhost/gateway-base:bookworm). Pass it to the build as
# `--build-arg BASE_IMAGE=...`. Needs root, debootstrap and a reachable Debian mirror.
set -eu
image="${1:-localhost/gateway-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs=$(mktemp -d /var/tmp/gateway-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
# python3-venv: `python3 -m venv` in the build stage (the slim image has it built in).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >&2
echo "$image"
