#!/usr/bin/env bash
# A clean Debian root with PostgreSQL from Debian's own packages, made once, outside the
# repository, and prints its path: where tests/integration/test_packages.py installs our .deb
# the way an operator would (README, "Install in your own cluster").
#   bookworm  Debian 12 with postgresql-15
#   trixie    Debian 13 with postgresql-17
# debootstrap (minbase) from Debian's mirror, then apt-get install postgresql-NN inside, with no
# cluster created and no service started. The root is never changed afterwards: each test mounts
# an overlay on it and throws the overlay away (test_packages.py).
# VETASSIST_ROOTS moves the cache (default /opt/vetassist-roots), VETASSIST_DEBIAN_MIRROR the
# mirror (default http://deb.debian.org/debian).
# Usage: scripts/ensure-debian-root.sh bookworm|trixie
set -euo pipefail
suite=${1:?usage: ensure-debian-root.sh bookworm|trixie}
case "$suite" in
bookworm) pg=15 ;;
trixie) pg=17 ;;
*) echo "no Debian root for '$suite' (bookworm, trixie)" >&2; exit 2 ;;
esac
CACHE=${VETASSIST_ROOTS:-/opt/vetassist-roots}
MIRROR=${VETASSIST_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${MIRROR%/debian}/debian-security
root="$CACHE/$suite"
stamp="$root/.vetassist-root"
want="$suite postgresql-$pg"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

ready() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }
if ready; then echo "$root"; exit 0; fi

$SUDO mkdir -p "$CACHE"
# Two suites started at once (two versions' tests) build their roots one at a time.
exec 9>"$CACHE/.$suite.lock"
flock 9
if ready; then echo "$root"; exit 0; fi

"$(dirname "$0")/ensure-debian-packages.sh" debootstrap

partial="$root.partial"
unmount_all() {
    for m in "$partial/dev/shm" "$partial/proc" "$partial/sys"; do
        if mountpoint -q "$m" 2>/dev/null; then $SUDO umount -l "$m"; fi
    done
}
trap unmount_all EXIT
unmount_all
$SUDO rm -rf "$partial"

echo "==> debootstrap $suite into $partial (a few minutes, once)" >&2
start=$SECONDS
$SUDO debootstrap --variant=minbase "$suite" "$partial" "$MIRROR" >&2 \
    || { tail -30 "$partial/debootstrap/debootstrap.log" >&2 2>/dev/null; exit 1; }
echo "    debootstrap took $((SECONDS - start)) s" >&2

# What a Debian host has: the release, its updates and its security updates.
$SUDO tee "$partial/etc/apt/sources.list" >/dev/null <<EOF
deb $MIRROR $suite main
deb $MIRROR $suite-updates main
deb $SECURITY $suite-security main
EOF
# No cluster from the package (the test creates its own) and no service started in the chroot.
$SUDO mkdir -p "$partial/etc/postgresql-common/createcluster.d"
echo "create_main_cluster = false" | $SUDO tee "$partial/etc/postgresql-common/createcluster.d/vetassist-no-main.conf" >/dev/null
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$partial/usr/sbin/policy-rc.d" >/dev/null
$SUDO chmod 755 "$partial/usr/sbin/policy-rc.d"

in_root() {
    $SUDO chroot "$partial" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}
$SUDO mount -t proc proc "$partial/proc"
echo "==> apt-get install postgresql-$pg in the $suite root" >&2
start=$SECONDS
in_root apt-get update -qq >&2
in_root apt-get install -y -qq --no-install-recommends "postgresql-$pg" >&2
in_root apt-get clean
echo "    postgresql-$pg took $((SECONDS - start)) s" >&2
unmount_all
$SUDO rm -f "$partial/usr/sbin/policy-rc.d"
if [ -n "$(ls -A "$partial/etc/postgresql/$pg" 2>/dev/null)" ]; then
    echo "the $suite root has a cluster after installing postgresql-$pg" >&2; exit 1
fi
echo "$want" | $SUDO tee "$partial/.vetassist-root" >/dev/null
$SUDO rm -rf "$root"
$SUDO mv "$partial" "$root"
echo "$root"
