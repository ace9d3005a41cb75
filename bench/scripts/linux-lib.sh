# Sourced by the benchmark scripts that boot Linux inside the soft-RoCE
# harness (disk.sh, linux-boot.sh, balloon.sh): goes to the repository's
# root and sets $out (where results go), $shoal (the release build, which
# must exist) and $linux_out (the Linux guest, built if missing).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=bench/results
shoal=target/release/shoal
[ -x "$shoal" ] || { echo "build first: cargo build --release" >&2; exit 1; }
linux_out=${SHOAL_LINUX_DIR:-/var/tmp/shoal-linux}/out
guest-images/linux/build.sh "$linux_out"
