#!/usr/bin/env bash
# Debian packages of vetassist_auth, one per PostgreSQL major: postgresql-NN-vetassist-auth_<version>_<arch>.deb
# under target/packages (README, "Install in your own cluster"), from `cargo pgrx package`
# (which builds, and installs nothing). Prints the path of each package it made.
#
#   /usr/lib/postgresql/NN/lib/vetassist_auth.so                 the library
#   /usr/share/postgresql/NN/extension/vetassist_auth.control    the control file
#   /usr/share/postgresql/NN/extension/vetassist_auth--*.sql     this version's install script (generated),
#                                                                the base script of 0.1.0 and every upgrade script
#   /usr/lib/postgresql/NN/lib/vetassist_auth/kms/               the master key providers (kms/), executable
#   /usr/share/doc/postgresql-NN-vetassist-auth/copyright        DEP-5 (packaging/deb/copyright)
#
# Usage: scripts/package.sh [--debug] [--pg-config PATH] [--versions V,...] [--out-dir DIR] NN...
#   --debug          the dev profile: reuses the debug build `cargo pgrx install` made for NN
#   --pg-config      the pg_config to build against (default: scripts/ensure-toolchain.sh NN's)
#   --versions       the packages to make from the one build (default: this version, Cargo.toml's).
#                    A released version V (sql/RELEASED) makes the package V would have shipped:
#                    Version V, default_version V, the base script and the chain up to V, and this
#                    build's library, which serves the SQL of earlier releases (the upgrade tests)
#   --out-dir DIR    where the packages go (default target/packages)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

debug="" pg_config="" versions="" out_dir="$ROOT/target/packages"
majors=()
while [ $# -gt 0 ]; do
    case "$1" in
    --debug) debug=1 ;;
    --pg-config) pg_config=$2; shift ;;
    --versions) versions=$2; shift ;;
    --out-dir) out_dir=$2; shift ;;
    [0-9][0-9]) majors+=("$1") ;;
    *) echo "usage: $0 [--debug] [--pg-config PATH] [--versions V,...] [--out-dir DIR] NN..." >&2; exit 2 ;;
    esac
    shift
done
[ ${#majors[@]} -gt 0 ] || { echo "which PostgreSQL major? (15 16 17 18)" >&2; exit 2; }
if [ -n "$pg_config" ] && [ ${#majors[@]} -ne 1 ]; then
    echo "--pg-config goes with one major" >&2; exit 2
fi

name=vetassist_auth
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
maintainer=$(python3 -c 'import json, sys; print(json.load(open("META.json"))["maintainer"])')
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
versions=${versions:-$version}

# The SQL scripts the package of version $1 ships, as names under sql/ (the generated install
# script of this version comes from cargo pgrx package): for this version every
# vetassist_auth--*.sql, for a released one the base script and the chain up to it (sql/RELEASED).
shipped_scripts() {
    if [ "$1" = "$version" ]; then
        (cd sql && ls "$name"--*.sql)
    else
        awk -v v="$1" '!/^#/ && NF { print $2; if ($1 == v) { found = 1; exit } } END { if (!found) exit 1 }' sql/RELEASED \
            || { echo "$1 is neither this version ($version) nor a released one (sql/RELEASED)" >&2; return 2; }
    fi
}

# make_deb MAJOR PKG_VERSION: the package of PKG_VERSION from what cargo pgrx package left in
# $so, $control and $pgrx_ext.
make_deb() {
    local major=$1 pkg_version=$2
    local package="postgresql-$major-vetassist-auth"
    local deb="$out_dir/${package}_${pkg_version}_${arch}.deb"
    local tree="$work/deb-$major-$pkg_version"
    local lib="$tree/usr/lib/postgresql/$major/lib"
    local ext="$tree/usr/share/postgresql/$major/extension"
    local doc="$tree/usr/share/doc/$package"
    local kms="$tree/usr/lib/postgresql/$major/lib/$name/kms"
    local shipped script
    shipped=$(shipped_scripts "$pkg_version")
    rm -rf "$tree"
    install -d "$tree/DEBIAN" "$lib" "$ext" "$doc" "$kms"
    # Stripped as Debian's dh_strip strips a shared library (the symbols Postgres looks up are
    # dynamic ones and stay).
    install -m 644 "$so" "$lib/$name.so"
    strip --remove-section=.comment --remove-section=.note --strip-unneeded "$lib/$name.so"
    sed "s/^default_version = .*/default_version = '$pkg_version'/" "$control" > "$ext/$name.control"
    chmod 644 "$ext/$name.control"
    if [ "$pkg_version" = "$version" ]; then
        install -m 644 "$pgrx_ext/$name--$version.sql" "$ext/"
    fi
    # pgrx copies the upgrade scripts (name--A--B.sql) but not the base install script of 0.1.0:
    # every script comes from sql/ here, and what pgrx copied must be the same.
    for script in $shipped; do
        if [ -f "$pgrx_ext/$script" ] && ! cmp -s "sql/$script" "$pgrx_ext/$script"; then
            echo "cargo pgrx package's $script differs from sql/$script" >&2; return 1
        fi
        install -m 644 "sql/$script" "$ext/"
    done
    install -m 755 kms/aws-kms kms/openbao-transit "$kms/"
    install -m 644 packaging/deb/copyright "$doc/copyright"
    # A native package's changelog (Debian policy 12.7): this version's entry.
    {
        echo "$package ($pkg_version) unstable; urgency=medium"
        echo
        echo "  * vetassist_auth $pkg_version for PostgreSQL $major, built by cargo pgrx package."
        echo "    Upgrades: ALTER EXTENSION vetassist_auth UPDATE after a restart."
        echo
        echo " -- $maintainer  $(date -u -R -d "@$epoch")"
    } | gzip -9n > "$doc/changelog.gz"
    chmod 644 "$doc/changelog.gz"

    # Dependencies: the server package of this major, and the shared libraries the library links
    # (dpkg-shlibdeps, from a throw-away debian/control; it cannot place Postgres's own symbols,
    # which the server provides, so its warnings are silenced).
    local shlibs
    shlibs=$(mkdir -p "$work/shlibs/debian" && cd "$work/shlibs" \
        && printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$package" "$package" > debian/control \
        && dpkg-shlibdeps -O --warnings=0 "$lib/$name.so" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
    [ -n "$shlibs" ] || { echo "dpkg-shlibdeps found no dependencies of $name.so" >&2; return 1; }
    (cd "$tree" && find usr -type f | LC_ALL=C sort | xargs md5sum) > "$tree/DEBIAN/md5sums"
    chmod 644 "$tree/DEBIAN/md5sums"
    {
        echo "Package: $package"
        echo "Version: $pkg_version"
        echo "Architecture: $arch"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $(du -sk --exclude=DEBIAN "$tree" | cut -f1)"
        echo "Depends: postgresql-$major, $shlibs"
        echo "Suggests: curl, awscli"
        echo "Section: database"
        echo "Priority: optional"
        echo "Description: VA.gov logins, encrypted tokens and HIPAA audit for PostgreSQL $major"
        echo " vetassist_auth keeps the logins of a veterans' health application inside"
        echo " PostgreSQL: accounts linked to a VA.gov identity, VA OAuth tokens encrypted"
        echo " at rest, sessions with HIPAA automatic logoff, TOTP MFA, searchable hashes of"
        echo " encrypted PHI and a tamper-evident audit trail, as plain SQL calls."
        echo " ."
        echo " Add vetassist_auth to shared_preload_libraries, give the server a master key"
        echo " (vetassist_auth.master_key_file, or master_key_command with a provider of"
        echo " /usr/lib/postgresql/$major/lib/$name/kms/: OpenBao/Vault Transit through"
        echo " curl, AWS KMS through the aws CLI), restart, and run"
        echo " CREATE EXTENSION $name in the application's database."
        if [ "$pkg_version" != "$version" ]; then
            echo " ."
            echo " A test package: the SQL of release $pkg_version with the library of $version."
        fi
    } > "$tree/DEBIAN/control"
    find "$tree" -type d -exec chmod 755 {} +
    find "$tree" -exec touch -h -d "@$epoch" {} +
    # A debug library is large and thrown away after the test: fast compression.
    local compress=(); [ -z "$debug" ] || compress=(-Zgzip -z1)
    rm -f "$deb"
    SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group "${compress[@]}" --build "$tree" "$deb" >&2
    echo "$deb"
}

for v in ${versions//,/ }; do shipped_scripts "$v" >/dev/null; done
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for major in "${majors[@]}"; do
    case "$major" in 15|16|17|18) ;; *) echo "PostgreSQL $major is not supported (15 16 17 18)" >&2; exit 2 ;; esac
    pgc=$pg_config
    if [ -z "$pgc" ]; then
        # PostgreSQL NN's headers and pgrx's config for it (installed on first use).
        scripts/ensure-toolchain.sh "$major" >&2
        pgc=$(scripts/ensure-postgres.sh "$major")
    fi
    have=$("$pgc" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
    [ "$have" = "$major" ] || { echo "$pgc is PostgreSQL $have, not $major" >&2; exit 2; }

    stage="$work/pgrx-$major"
    echo "==> cargo pgrx package ${debug:+--debug }--pg-config $pgc" >&2
    cargo pgrx package ${debug:+--debug} --pg-config "$pgc" --out-dir "$stage" >&2
    so=$(find "$stage" -name "$name.so" -type f)
    control=$(find "$stage" -name "$name.control" -type f)
    [ -n "$so" ] && [ -n "$control" ] || { echo "cargo pgrx package made no $name.so or $name.control under $stage" >&2; exit 1; }
    pgrx_ext=$(dirname "$control")
    [ -f "$pgrx_ext/$name--$version.sql" ] || { echo "cargo pgrx package made no $name--$version.sql" >&2; exit 1; }
    grep -q "^default_version = '$version'$" "$control" \
        || { echo "cargo pgrx package's control file does not name $version" >&2; exit 1; }
    for v in ${versions//,/ }; do
        make_deb "$major" "$v"
    done
done
