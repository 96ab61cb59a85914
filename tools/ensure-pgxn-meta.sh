#!/usr/bin/env bash
# The PGXN META.json validator, pgxn_meta (crates.io, its CLI), built once outside the repository,
# and prints its path. PGXN's own Perl tools (PGXN::Meta::Validator) need CPAN, which this
# project cannot reach; pgxn_meta validates the same Meta Spec v1 (and v2) with its JSON schemas.
# VETASSIST_TOOLS moves the cache (default /opt/vetassist-tools).
# Usage: tools/ensure-pgxn-meta.sh
set -euo pipefail
VERSION=0.7.0
CACHE=${VETASSIST_TOOLS:-/opt/vetassist-tools}
root="$CACHE/pgxn_meta-$VERSION"
bin="$root/bin/pgxn_meta"
if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$VERSION"; then
    echo "==> cargo install pgxn_meta $VERSION into $root (about a minute, once)" >&2
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.pgxn_meta.lock"
    flock 9
    if [ ! -x "$bin" ]; then
        # Its own target directory: nothing of the extension's build is touched.
        tmp=$(mktemp -d)
        CARGO_TARGET_DIR="$tmp" cargo install pgxn_meta --version "=$VERSION" --locked --quiet --root "$root" >&2
        rm -rf "$tmp"
    fi
fi
echo "$bin"
