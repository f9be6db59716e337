#!/bin/sh
# A base image for docker/app.Dockerfile built from Debian packages alone, for hosts that reach
# no image registry (`make image-base`; docs/containers.md). It has the layout of Flower's own
# images: the non-root user `app` (UID 49999, home /app) and a Python venv at /python/venv on the
# PATH, owned by `app`. Flower itself is installed by the app image, from pyproject.toml.
#
#   docker/build-base.sh [TAG]          default TAG: localhost/fedalign-base:bookworm
#
# Needs root, debootstrap and podman. DEBIAN_MIRROR overrides the mirror, which is otherwise
# the first one this host's apt uses (else debootstrap's default); DEBIAN_SUITE the release.
set -eu

tag=${1:-localhost/fedalign-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '$1 == "URIs:" { print $2; exit } $1 == "deb" { print $2; exit }')}

[ "$(id -u)" = 0 ] || { echo "error: building the base image needs root (debootstrap)" >&2; exit 2; }
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool is not installed (Debian: apt-get install $tool)" >&2; exit 2; }
done

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/fedalign-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT INT TERM

echo "base image: debootstrap $suite (${mirror:-debootstrap's default mirror})"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" ${mirror:+"$mirror"} >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

chroot "$rootfs" useradd --uid 49999 --user-group --home-dir /app --no-create-home \
    --shell /bin/sh app
chroot "$rootfs" python3 -m venv /python/venv
mkdir -p "$rootfs/app"
chroot "$rootfs" chown -R app:app /app /python/venv
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

tar -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV HOME=/app LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1' \
    --change 'USER app' \
    --change 'WORKDIR /app' \
    --change 'CMD ["python"]' \
    - "$tag" >/dev/null
echo "base image: $tag"
