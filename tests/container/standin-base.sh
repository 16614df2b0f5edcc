#!/usr/bin/env bash
# Builds a stand-in for the python:3.11-slim base image from Debian's packages, for
# machines that reach Debian's archive but no image registry. Debian bookworm's python3 is
# 3.11. Like the real image it has pip and venv and lets pip install into the system
# Python (no EXTERNALLY-MANAGED marker); it adds this machine's extra CA certificates, so
# that pip inside the build trusts the same TLS roots as the host.
#   usage: standin-base.sh ENGINE IMAGE-TAG
# Needs root (debootstrap). Leaves nothing mounted and removes its work directory.
set -euo pipefail
engine=${1:?engine (podman or docker)}
tag=${2:?image tag}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d /var/tmp/relay-standin.XXXXXX)
root=$work/rootfs

cleanup() {
    # debootstrap mounts proc/sys/dev inside the target while it configures packages
    local m
    for m in $(awk -v r="$root" 'index($5, r) == 1 {print $5}' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

echo "stand-in base: debootstrap bookworm (python3 3.11) from $mirror"
timeout 900 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    echo "standin-base.sh: debootstrap failed (log above)" >&2
    exit 1
}

# the host's extra TLS roots (an egress proxy's CA, a company CA)
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates > /dev/null 2>&1
fi
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*

tar -C "$root" --numeric-owner -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --quiet - "$tag" > /dev/null
echo "stand-in base: $tag ($("$engine" image inspect --format '{{.Size}}' "$tag") bytes)"
