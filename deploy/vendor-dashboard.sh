#!/usr/bin/env bash
# Rebuild the dashboard's vendored JavaScript (aggregator/ops/dashboard/static/vendor/) from the
# npm registry: exactly the pinned versions, each tarball checked against its pinned SHA-256,
# then the copied files against vendor/SHA256SUMS.
#
# The repository holds the files this script writes: nothing is fetched when fedmq runs or is
# tested. Run it only to check the vendored files or to move to new versions (then update the
# pins below and vendor/SHA256SUMS, and say why in the commit). Needs npm, tar, gzip, sha256sum.
#
#   deploy/vendor-dashboard.sh          fetch, verify, copy (and re-compress the .gz copies)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR="$REPO_ROOT/aggregator/ops/dashboard/static/vendor"

# package@version, then the SHA-256 of the tarball `npm pack` downloads for it.
PACKAGES=(
    "mqtt@5.16.0 c7d13d6dedf4c15063fb61d645c82d07d2a24f79b15736f313e96e116177950f"
    "uplot@1.6.32 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d"
)

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v npm >/dev/null 2>&1 || die "npm not found (Debian: apt-get install npm)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

for entry in "${PACKAGES[@]}"; do
    spec="${entry% *}"
    want="${entry#* }"
    name="${spec%@*}"
    tarball="$(npm pack --silent "$spec" | tail -n 1)"
    got="$(sha256sum "$tarball" | cut -d ' ' -f 1)"
    [ "$got" = "$want" ] || die "$spec: tarball sha256 $got, pinned $want"
    mkdir -p "$name"
    tar -xzf "$tarball" -C "$name"
    printf '%s: %s ok\n' "$spec" "$tarball"
done

mkdir -p "$VENDOR"
# The browser bundles (mqtt.js's is built with its Node polyfills: see vendor/README.txt).
install -m 0644 mqtt/package/dist/mqtt.min.js "$VENDOR/mqtt.min.js"
install -m 0644 mqtt/package/LICENSE.md "$VENDOR/LICENSE-mqtt.txt"
install -m 0644 uplot/package/dist/uPlot.iife.min.js "$VENDOR/uPlot.iife.min.js"
install -m 0644 uplot/package/dist/uPlot.min.css "$VENDOR/uPlot.min.css"
install -m 0644 uplot/package/LICENSE "$VENDOR/LICENSE-uplot.txt"

# Mosquitto serves files as they are, uncompressed: the page fetches these gzip copies and
# inflates them itself (static/loader.js), so they cross the network compressed. -n: no name
# or time stamp in the header, so the same input gives the same bytes.
for js in mqtt.min.js uPlot.iife.min.js; do
    gzip -9 -n -c "$VENDOR/$js" > "$VENDOR/$js.gz"
done

(cd "$VENDOR" && sha256sum --check --strict SHA256SUMS)
printf 'vendored files in %s match SHA256SUMS\n' "$VENDOR"
