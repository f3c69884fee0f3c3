#!/bin/sh
# Build a Debian package of slipway with dpkg-deb (no cargo-deb needed):
#   dist/build-deb.sh                 # cargo build --release --locked, then package
#   SLIPWAY_BIN=path dist/build-deb.sh   # package an existing binary
# Writes dist/out/slipway_VERSION_ARCH.deb (SLIPWAY_DEB_OUT: another
# directory; SLIPWAY_DEB_COMPRESSION: gzip is faster than the default xz). Installs /usr/bin/slipway, the
# systemd unit, and an example /etc/slipway/slipway.toml (a conffile);
# enables the service on a systemd host, never starts it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
if [ -z "${SLIPWAY_BIN:-}" ]; then
    (cd "$root" && cargo build --release --locked)
    SLIPWAY_BIN="${CARGO_TARGET_DIR:-$root/target}/release/slipway"
fi
stage=$(mktemp -d)
chmod 755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -D -m 755 -s "$SLIPWAY_BIN" "$stage/usr/bin/slipway"
install -D -m 644 "$root/dist/slipway.service" "$stage/lib/systemd/system/slipway.service"
install -d -m 755 "$stage/etc/slipway"
cat > "$stage/etc/slipway/slipway.toml" <<'TOML'
# slipway server settings: keys are the flags of `slipway server`.
# Flags and SLIPWAY_* environment variables win over this file.
# data = "/var/lib/slipway"
# http = "0.0.0.0:8080"
# ssh = "0.0.0.0:2222"
# api = "127.0.0.1:7070"
# domain = "apps.example.com"
TOML
install -d -m 755 "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: slipway
Version: $version
Architecture: $arch
Maintainer: slipway maintainers <slipway@localhost>
Depends: git, python3, python3-venv, ca-certificates
Section: admin
Priority: optional
Description: self-hosted git push to deploy
 One binary: git over HTTP and SSH, builds, a supervisor and a reverse
 proxy for Python web apps, each app as its own user.
CONTROL
echo /etc/slipway/slipway.toml > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    systemctl enable slipway.service || true
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now slipway.service || true
fi
PRERM
chmod 755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"
out_dir=${SLIPWAY_DEB_OUT:-$root/dist/out}
mkdir -p "$out_dir"
out="$out_dir/slipway_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"${SLIPWAY_DEB_COMPRESSION:-xz}" --build "$stage" "$out" >/dev/null
echo "$out"
