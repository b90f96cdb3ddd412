#!/usr/bin/env bash
# Runs every test outside tests/ as nobody (uid 65534), to show that none of
# them needs root. Run as root from the repository root:
#   bash tests/tools/unprivileged.sh
# The test binaries are built as root (debug profile), then run as nobody
# from their package's directory, as cargo would run them. node/sim's tests
# run from their own binary, because node/tests/sim.rs needs a Rust
# toolchain, which nobody has on a machine where rustup lives in /root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the binaries are run as nobody through setpriv" >&2
    exit 1
fi
list=$(mktemp)
trap 'rm -f "$list"' EXIT
# Prints "DIR EXECUTABLE" for each test binary in cargo's JSON messages;
# $1 is a target name to leave out.
test_binaries() {
    python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        if m["target"]["name"] != sys.argv[1]:
            print(os.path.dirname(m["manifest_path"]), m["executable"])
' "$1"
}
# node/tests/sim.rs is the runner; the tests it runs follow below.
cargo test --workspace --exclude vpcgate-e2e --no-run --message-format=json 2>/dev/null |
    test_binaries sim >"$list"
cargo test --locked --manifest-path node/sim/Cargo.toml --target-dir target/unprivileged-sim \
    --no-run --message-format=json 2>/dev/null | test_binaries - >>"$list"
chmod -R o+rX target
failed=0
while read -r dir bin; do
    if out=$(cd "$dir" && setpriv --reuid=65534 --regid=65534 --clear-groups \
        env -i PATH=/usr/bin:/bin HOME=/tmp "$bin" 2>&1); then
        echo "ok    $(basename "$bin"): $(grep 'test result' <<<"$out" | tail -1)"
    else
        echo "FAIL  $(basename "$bin") (from $dir):"
        grep -E 'panicked|FAILED' <<<"$out" | head -20
        failed=1
    fi
done <"$list"
exit $failed
