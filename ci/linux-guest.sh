#!/bin/sh
# Runs inside the soft-RoCE harness (ci/softroce.sh), where nested KVM can
# run a stock kernel: Debian's kernel booted by shoal with the initramfs of
# guest-images/linux/build.sh (copied in as /vmlinuz, /vmlinux and
# /initrd.img), as a bzImage and through its PVH entry, on one node and on
# a 2-node pod (dormant pages on and off; only with LINUX_POD=1, see
# below), running memfill over 64 MiB; and a guest command's exit status
# becoming shoal's. Checks the guest's own output,
# shoal's status and the metrics. $SHOAL_LINUX_TIMES, when set, names a file
# that gets one line per boot: name, seconds to init, shoal's wall seconds.
set -eu
fail() { echo "linux-guest: FAILED: $*" >&2; exit 1; }
[ "${GUEST_KVM:-0}" = 1 ] || fail "no /dev/kvm inside the harness (nested KVM did not load)"
BASE="console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux quiet"

# boot NAME KERNEL "GUEST COMMAND" [shoal options...]: sets $status
boot() {
  name=$1; kernel=$2; cmd=$3; shift 3
  status=0
  timeout -k 10 600 shoal run --kernel "$kernel" --initrd /initrd.img --memory 256M --cmdline "$BASE -- $cmd" \
    --metrics-json "/tmp/$name.json" "$@" >"/tmp/$name.out" 2>"/tmp/$name.err" || status=$?
  cat "/tmp/$name.out"
  tail -n 3 "/tmp/$name.err" >&2
  if [ -n "${SHOAL_LINUX_TIMES:-}" ]; then
    up=$(sed -n 's/^shoal-init: up \([0-9.]*\).*/\1/p' "/tmp/$name.out" | head -1)
    wall=$(grep -m1 '"wall_seconds"' "/tmp/$name.json" | tr -dc '0-9.')
    echo "$name ${up:-?} ${wall:-?}" >>"$SHOAL_LINUX_TIMES"
  fi
}
# the Nth (1 = total, 2 = node 0, 3 = node 1) value of a metric
metric() { grep "\"$2\"" "/tmp/$1.json" | sed -n "${3}p" | tr -dc 0-9; }

# one node: the bzImage through the 64-bit boot protocol, the ELF vmlinux
# through its PVH entry
for k in one:/vmlinuz pvh:/vmlinux; do
  n=${k%%:*}
  boot "$n" "${k#*:}" "/bin/memfill 64"
  [ "$status" = 0 ] || fail "$n: shoal exited with status $status"
  grep -q "memfill: verified 64 MiB" "/tmp/$n.out" || fail "$n: memfill did not verify"
  grep -q "shoal-init: exit status 0" "/tmp/$n.out" || fail "$n: init did not report status 0"
  [ "$(metric "$n" bytes_fabric_read 1)" = 0 ] || fail "$n: bytes on a fabric"
  [ "$(metric "$n" pages_zero_filled 1)" -gt 16384 ] || fail "$n: fewer pages zero-filled than memfill touched"
done

# two vCPUs, found through the MP tables. Pinned, one per CPU of the
# harness's QEMU: unpinned, both vCPU threads can land on one CPU of the
# QEMU guest, and while nested KVM runs one of them there the other never
# gets that CPU back (the QEMU guest's kernel reports a soft lockup).
boot smp /vmlinuz "/bin/memfill 64" --cpus 2 --pin
[ "$status" = 0 ] || fail "smp: shoal exited with status $status"
grep -q "shoal-init: up .*, 2 CPUs online" /tmp/smp.out || fail "smp: the kernel did not bring up both vCPUs"
grep -q "memfill: verified 64 MiB" /tmp/smp.out || fail "smp: memfill did not verify"

boot status /vmlinuz /bin/false
[ "$status" = 1 ] || fail "/bin/false's status 1 came back as $status"

if [ "${LINUX_POD:-0}" != 1 ]; then
  echo "linux-guest: ok: one node as a bzImage and through PVH, 2 vCPUs (memfill 64 MiB verified)," \
    "the exit status;" \
    "pod boots not run" \
    "(LINUX_POD=1 runs them: a Linux guest on a pod triple-faults now and then, an open problem)"
  exit 0
fi

# a 2-node pod: blocks homed on both nodes. Dormant pages are zero-filled
# where they are touched (no page bytes on the wire); with dormant pages
# off every page has contents at its home and node 0 pulls the ones homed
# on node 1. (With --node-memory forcing evictions a Linux guest still
# triple-faults here after some thousand pages moved: an open problem, see
# the issue; the unikernel pod tests cover eviction.)
boot pod /vmlinuz "/bin/memfill 64" --nodes 2 --fabric shm
[ "$status" = 0 ] || fail "pod: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/pod.out || fail "pod: memfill did not verify"
[ "$(metric pod bytes_fabric_read 1)" = 0 ] || fail "pod: page bytes crossed with dormant pages on"
[ "$(metric pod pages_zero_filled 2)" -gt 16384 ] || fail "pod: node 0 zero-filled too few pages"

boot podoff /vmlinuz "/bin/memfill 64" --nodes 2 --fabric shm --dormant off
[ "$status" = 0 ] || fail "pod, dormant off: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/podoff.out || fail "pod, dormant off: memfill did not verify"
fetched=$(metric podoff remote_fetches 1)
bytes=$(metric podoff bytes_fabric_read 1)
[ "$fetched" -gt 0 ] || fail "pod, dormant off: no page crossed"
[ "$bytes" = $((fetched * 4096)) ] || fail "pod, dormant off: $bytes bytes on the wire for $fetched pages"
[ "$(metric podoff pages_zero_filled 1)" = 0 ] || fail "pod, dormant off: pages were zero-filled"
echo "linux-guest: ok: one node (bzImage, PVH, 2 vCPUs), exit status, a 2-node pod with $(metric pod pages_zero_filled 1) pages" \
  "zero-filled and 0 bytes on the wire, and with dormant pages off $fetched pages ($bytes bytes) pulled"
