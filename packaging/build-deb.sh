#!/usr/bin/env bash
# Builds the vpcgate Debian package for one architecture:
#
#   packaging/build-deb.sh amd64|arm64
#
# and writes target/packages/vpcgate_<version>_<arch>.deb, whose path is the
# last line on stdout (everything else goes to stderr). The binaries are
# static (musl), so one package serves every Ubuntu from 18.04 on.
#
# What it needs, and installs when run as root if missing: the Rust target
# (rustup target add), musl-tools (amd64: musl-gcc for ring's C code),
# gcc-aarch64-linux-gnu (arm64: the cross linker and C compiler), and dpkg-deb
# and readelf (binutils). Running it again rebuilds and replaces the package.
#
# The man pages and shell completions come from the binaries themselves, so
# the build runs them: natively, through binfmt_misc or under
# qemu-user-static (qemu-aarch64-static for arm64 on x86_64). Where none of
# those works, it also builds them for this machine and runs those.
#
# Environment:
#   VPCGATE_PKG_TARGET_DIR  cargo's target directory for these builds
#                           (default target/musl: apart from the usual
#                           target/, so a concurrent `cargo test` does not
#                           hold its lock)
#   VPCGATE_PKG_OUT_DIR     where the .deb goes (default target/packages)
#   SOURCE_DATE_EPOCH       file dates in the package (default: the last
#                           commit's date, else Cargo.lock's)
#   CARGO_BUILD_JOBS        cargo's parallelism, as usual
set -euo pipefail
umask 022

die() {
    echo "build-deb.sh: $*" >&2
    exit 1
}
note() {
    echo "build-deb.sh: $*" >&2
}

if [ $# -ne 1 ]; then
    echo "usage: $0 amd64|arm64" >&2
    exit 2
fi
arch=$1
case "$arch" in
    amd64) target=x86_64-unknown-linux-musl ;;
    arm64) target=aarch64-unknown-linux-musl ;;
    *)
        echo "build-deb.sh: unknown architecture '$arch'; give amd64 or arm64" >&2
        exit 2
        ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pkg=$root/packaging
target_dir=${VPCGATE_PKG_TARGET_DIR:-$root/target/musl}
out_dir=${VPCGATE_PKG_OUT_DIR:-$root/target/packages}

# --- tools ------------------------------------------------------------------

# Debian packages for the commands that are missing: "command package" pairs.
missing_debs() {
    local cmd deb
    while [ $# -gt 1 ]; do
        cmd=$1 deb=$2
        shift 2
        command -v "$cmd" >/dev/null 2>&1 || echo "$deb"
    done
}

tools=(dpkg-deb dpkg readelf binutils)
case "$arch" in
    amd64) tools+=(musl-gcc musl-tools) ;;
    arm64) tools+=(aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu aarch64-linux-gnu-ar binutils-aarch64-linux-gnu) ;;
esac
mapfile -t debs < <(missing_debs "${tools[@]}" | sort -u)
if [ ${#debs[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing Debian packages: ${debs[*]}; install them (as root: apt-get install ${debs[*]}) and run this again"
    fi
    note "installing ${debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only if they do not know a package yet.
    if ! apt-get install -y --no-install-recommends "${debs[@]}" >&2; then
        apt-get update >&2 || die "apt-get update failed"
        apt-get install -y --no-install-recommends "${debs[@]}" >&2 ||
            die "could not install ${debs[*]}"
    fi
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) first"
if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -x "$target" >/dev/null; then
        note "adding the Rust target $target"
        rustup target add "$target" >&2 || die "rustup target add $target failed"
    fi
elif [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]; then
    die "the Rust standard library for $target is not installed, and there is no rustup to add it"
fi

dpkg-deb --help | grep -- --root-owner-group >/dev/null ||
    die "dpkg-deb is too old (no --root-owner-group); use dpkg 1.19 or newer"

# Run from `cargo test`, this script inherits the variables cargo sets for a
# test (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Build scripts watch some of
# them, so the nested cargo would rebuild everything that a run from a shell
# had built already.
while IFS= read -r var; do
    unset "$var"
done < <(compgen -e | grep -E '^(CARGO_(MANIFEST_|PKG_|CRATE_NAME|BIN_NAME|PRIMARY_PACKAGE|TARGET_TMPDIR)|OUT_DIR$)')

# --- version ----------------------------------------------------------------

cd "$root"
pkgid=$(cargo pkgid --locked -p vpcgated) || die "cargo pkgid failed; is Cargo.lock up to date?"
cargo_version=${pkgid##*[#@:]}
[[ $cargo_version =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]*)?$ ]] ||
    die "cannot read the version from '$pkgid'"
# A Cargo pre-release (1.2.0-rc.1) must sort before the release in Debian too.
version=${cargo_version/-/\~}

workspace_field() {
    awk -v key="$1" '
        /^\[/ { in_ws = ($0 == "[workspace.package]"); next }
        in_ws && $1 == key && $2 == "=" { v = $3; gsub(/"/, "", v); print v; exit }
    ' "$root/Cargo.toml"
}
homepage=$(workspace_field repository)

# File dates in the package, and the date in the man pages.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null ||
        stat -c %Y "$root/Cargo.lock")
fi
export SOURCE_DATE_EPOCH

# --- build ------------------------------------------------------------------

note "building vpcgated and vpcgate $cargo_version for $target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
# The only C in the build is ring's. Debian has no aarch64 musl headers, and
# the glibc cross compiler would pick up the host's x86_64 ones, so compile it
# without any libc headers: ring supports that (its build does the same for
# clang).
export CFLAGS_aarch64_unknown_linux_musl="-ffreestanding -DRING_CORE_NOSTDLIBINC=1"
# The workspace's release profile keeps line tables for profiling; the
# package does not need them.
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=debuginfo
cargo build --release --locked --target "$target" --target-dir "$target_dir" \
    -p vpcgated -p vpcgate --bins >&2 || die "cargo build for $target failed"
bin_dir=$target_dir/$target/release

for bin in vpcgated vpcgate; do
    [ -x "$bin_dir/$bin" ] || die "cargo did not produce $bin_dir/$bin"
    # Static means no program interpreter and no shared libraries.
    if readelf -lW "$bin_dir/$bin" | grep 'program interpreter' >/dev/null ||
        readelf -dW "$bin_dir/$bin" | grep '(NEEDED)' >/dev/null; then
        die "$bin_dir/$bin is dynamically linked; a static musl build was expected"
    fi
done

# --- what runs here ---------------------------------------------------------

# The man pages and completions are written by the binaries, from the clap
# definitions they parse with; those are the same for every architecture.
case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
esac
gen_dir=$bin_dir
gen_runner=()
if ! "$bin_dir/vpcgate" --version >/dev/null 2>&1; then
    if command -v "qemu-$machine-static" >/dev/null 2>&1 &&
        "qemu-$machine-static" "$bin_dir/vpcgate" --version >/dev/null 2>&1; then
        gen_runner=("qemu-$machine-static")
    else
        host=$(rustc -vV | sed -n 's/^host: //p')
        [ -n "$host" ] || die "cannot tell this machine's Rust target (rustc -vV)"
        note "cannot run $arch binaries here (no qemu-user-static?); building for $host to write the man pages and completions"
        cargo build --release --locked --target "$host" --target-dir "$target_dir" \
            -p vpcgated -p vpcgate --bins >&2 || die "cargo build for $host failed"
        gen_dir=$target_dir/$host/release
    fi
fi
# generate BIN ARG...: runs BIN from gen_dir.
generate() {
    local bin=$1
    shift
    ${gen_runner[@]+"${gen_runner[@]}"} "$gen_dir/$bin" "$@"
}

# --- package tree -----------------------------------------------------------

stage=$(mktemp -d "${TMPDIR:-/tmp}/vpcgate-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -m 0755 "$bin_dir/vpcgated" "$stage/usr/bin/vpcgated"
install -D -m 0755 "$bin_dir/vpcgate" "$stage/usr/bin/vpcgate"
install -D -m 0644 "$root/systemd/vpcgated.service" "$stage/lib/systemd/system/vpcgated.service"
install -D -m 0644 "$pkg/sysctl.d/90-vpcgate.conf" "$stage/usr/lib/sysctl.d/90-vpcgate.conf"
install -D -m 0644 "$pkg/tmpfiles.d/vpcgate.conf" "$stage/usr/lib/tmpfiles.d/vpcgate.conf"

# Section 8 for both: the daemon, and a CLI that needs root or the vpcgate
# group. vpcgate has a page per subcommand (vpcgate-peer-add.8, ...), which
# vpcgate.8 names.
man8=$stage/usr/share/man/man8
generate vpcgated --generate-man-pages "$man8" >&2 || die "vpcgated --generate-man-pages failed"
generate vpcgate generate-man-pages "$man8" >&2 || die "vpcgate generate-man-pages failed"
for page in vpcgated.8 vpcgate.8; do
    [ -s "$man8/$page" ] || die "no $page was generated"
done
# -n: no name or time stamp in the gzip header, so the bytes are reproducible.
gzip -9n "$man8"/*.8
chmod 0644 "$man8"/*.8.gz

share=$stage/usr/share
install -d -m 0755 "$share/bash-completion/completions" "$share/zsh/vendor-completions" \
    "$share/fish/vendor_completions.d"
for bin in vpcgated vpcgate; do
    case "$bin" in
        vpcgated) how=(--generate-completions) ;;
        vpcgate) how=(completions) ;;
    esac
    for shell in bash zsh fish; do
        case "$shell" in
            bash) file=$share/bash-completion/completions/$bin ;;
            zsh) file=$share/zsh/vendor-completions/_$bin ;;
            fish) file=$share/fish/vendor_completions.d/$bin.fish ;;
        esac
        generate "$bin" "${how[@]}" "$shell" >"$file" || die "$bin ${how[*]} $shell failed"
        [ -s "$file" ] || die "$bin ${how[*]} $shell wrote nothing"
        chmod 0644 "$file"
    done
done

doc=$stage/usr/share/doc/vpcgate
install -D -m 0644 "$root/README.md" "$doc/README.md"
install -D -m 0644 "$pkg/README.md" "$doc/README.packaging.md"

# copyright: ours, then (in the same paragraph) every crate in the binaries
# with its licence.
{
    cat "$pkg/debian/copyright"
    echo "Comment: The binaries are statically linked with musl libc (MIT) and built"
    echo " from these Rust crates (procedural macros included), under the licences"
    echo " their Cargo.toml files name:"
    cargo tree --locked -e normal --target "$target" -p vpcgated -p vpcgate \
        --prefix none --format '{p} {l}' |
        grep -v -e ' (/' -e '^$' | sed 's/ (\*)$//' | sort -u | sed 's/^/ /'
} >"$doc/copyright" || die "cargo tree failed while listing the crates' licences"
chmod 0644 "$doc/copyright"

mkdir -p "$stage/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$pkg/debian/$script" "$stage/DEBIAN/$script"
done

# As dpkg-gencontrol counts it: each file's size rounded up to a KiB, and one
# KiB for each directory.
installed_size=$(cd "$stage" && find . -path ./DEBIAN -prune -o -printf '%y %s\n' |
    awk '$1 == "f" { kib += int(($2 + 1023) / 1024); next } { kib += 1 } END { print kib }')
{
    echo "Package: vpcgate"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: vpcgate developers <vpcgate@example.invalid>"
    echo "Installed-Size: $installed_size"
    # useradd and groupadd for the service account.
    echo "Depends: passwd"
    # nft for the SNAT table; without it vpcgated runs, but without SNAT.
    echo "Recommends: nftables"
    echo "Suggests: wireguard-tools"
    echo "Section: net"
    echo "Priority: optional"
    [ -z "$homepage" ] || echo "Homepage: $homepage"
    cat <<'EOF'
Description: userspace WireGuard subnet router for small cloud VMs
 vpcgate turns a small VM inside a VPC into a WireGuard gateway, so that
 laptops and other machines reach the VPC and the networks peered with it,
 such as a managed database's, with no account and no coordination server.
 .
 vpcgated is the daemon (WireGuard in userspace, managed with the standard
 wg tool); vpcgate is its command line. The package runs vpcgated as a
 hardened systemd service and turns on IP forwarding.
EOF
} >"$stage/DEBIAN/control"

(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"

find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# --- the .deb ---------------------------------------------------------------

mkdir -p "$out_dir"
deb=$out_dir/vpcgate_${version}_${arch}.deb
# xz, not dpkg's newer zstd default: Debian's dpkg before 1.21.18 cannot
# read zstd members.
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb.tmp" >&2 || die "dpkg-deb --build failed"
mv -f "$deb.tmp" "$deb"
note "wrote $deb"
echo "$deb"
