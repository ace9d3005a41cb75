#!/bin/sh
# Runs inside the soft-RoCE harness (ci/softroce.sh), where nested KVM can
# run a stock kernel: Debian's kernel booted by shoal with the initramfs of
# guest-images/linux/build.sh (copied in as /vmlinuz, /vmlinux and
# /initrd.img), as a bzImage and through its PVH entry, on one node and on
# a 2-node pod (dormant pages on and off, and with less memory a node than
# the guest touches), running memfill over 64 MiB; a guest command's
# exit status becoming shoal's; and the ends of a guest: `poweroff -f`
# (ACPI), `reboot -f`, a kernel panic and `halt -f`; and virtio disks: an
# ext4 root file system on /dev/vda written by the guest and read back here,
# a read-only disk the guest cannot write, discards that punch holes, on one
# node and on a pod (they need mkfs.ext4, e2fsck and debugfs, which
# ci/test.sh copies in); and the balloon: memory the guest frees goes back,
# on one node and on a pod. `linux-guest SECTION...` runs some of them
# (one, pods, disks, balloon; see the end); `linux-guest smp` boots two
# vCPUs instead (see below). Checks the guest's own output, shoal's status and the
# metrics. $SHOAL_LINUX_TIMES, when set, names a file
# that gets one line per boot: name, seconds to init, shoal's wall seconds.
set -eu
fail() { echo "linux-guest: FAILED: $*" >&2; exit 1; }
[ "${GUEST_KVM:-0}" = 1 ] || fail "no /dev/kvm inside the harness (nested KVM did not load)"
BASE="console=ttyS0 panic=-1 pci=off i8042.noaux quiet"

# Pods here beat as everywhere, but the harness's nested KVM under TCG can
# starve a node process for seconds (see ci/test.sh): the silence that
# counts as a hung node is raised from 1.5 s to a minute for these boots.
POD="--liveness-timeout 60"
# Boots whose subject is not the balloon run without it. Linux takes the
# chunks it reports free (up to 32 of 2-4 MiB, 128 MiB) off its free lists
# until the device hands the report back and its worker runs again; an
# allocation in that window can fail. memfill 64 in a 256 MiB guest (177
# MiB available) was OOM-killed at 51 MiB in 2 CI runs of about 8 (`one`,
# a single node): the balloon is tested below with the headroom it needs.
NOBALLOON="--balloon off"

# boot NAME KERNEL "GUEST COMMAND" [shoal options...]: sets $status
# ($KARGS: kernel arguments before the command's "--")
boot() {
  name=$1; kernel=$2; cmd=$3; shift 3
  status=0
  timeout -k 10 600 shoal run --kernel "$kernel" --initrd /initrd.img --memory 256M \
    --cmdline "$BASE ${KARGS:-} -- $cmd" \
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

# Virtio disks. A root file system built here with mkfs.ext4 -d over the
# initramfs's own tree (busybox, this init), a test script on it, and a
# second, read-only disk. The guest (on /dev/vda as its root) reads the
# disks' serials and read-only flags, writes 16 MiB, deletes it and trims
# (discards punch holes in the image), writes /hello.txt, and finds it
# cannot write the read-only disk; init remounts the root read-only before
# it powers off. Here: the file system is clean (e2fsck), the file reads
# back (debugfs, no mount), the read-only image is unchanged, and the root
# image holds less than the 16 MiB the guest wrote and freed.
disks() {
  d=/dev/shm/disks # tmpfs: the images can have holes punched
  rm -rf "$d"; mkdir -p "$d/tree" "$d/data"
  (cd "$d/tree" && zcat /initrd.img | cpio -id 2>/dev/null)
  cat >"$d/tree/disk-test" <<'GUEST'
set -e
echo "disk-test: serials $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial); read-only $(cat /sys/block/vda/ro) $(cat /sys/block/vdb/ro)"
dd if=/dev/zero of=/big bs=1M count=16 2>/dev/null
sync
rm /big
sync
fstrim -v /
echo "written by the guest through virtio-blk" >/hello.txt
sync
mkdir -p /mnt
mount /dev/vdb /mnt 2>/dev/null || mount -o ro /dev/vdb /mnt
grep " /mnt " /proc/mounts
grep -q " /mnt ext4 ro," /proc/mounts || { echo "disk-test: the read-only disk is mounted writable"; exit 1; }
cat /mnt/data.txt
if echo x 2>/dev/null >/mnt/new; then echo "disk-test: a file was written on the read-only disk"; exit 1; fi
umount /mnt
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; then echo "disk-test: the read-only disk took a raw write"; exit 1; fi
echo "disk-test: ok"
GUEST
  echo "read from the read-only disk" >"$d/data/data.txt"
  mkfs.ext4 -q -F -d "$d/tree" "$d/root.img" 64M || fail "disks: mkfs.ext4 root.img"
  mkfs.ext4 -q -F -d "$d/data" "$d/data.img" 8M || fail "disks: mkfs.ext4 data.img"
  data_sum=$(sha256sum <"$d/data.img")
  before=$(stat -c %b "$d/root.img")
  KARGS="root=/dev/vda"
  boot disk /vmlinuz "/bin/sh /disk-test" --timeout 300 \
    --disk "$d/root.img" --disk "$d/data.img,readonly"
  [ "$status" = 0 ] || fail "disk: shoal exited with status $status"
  grep -q "shoal-init: root /dev/vda (ext4, rw)" /tmp/disk.out || fail "disk: init did not switch to the ext4 root"
  grep -q "disk-test: serials shoal-disk0 shoal-disk1; read-only 0 1" /tmp/disk.out ||
    fail "disk: the guest did not see the disks' serials and read-only flags"
  grep -q "read from the read-only disk" /tmp/disk.out || fail "disk: the read-only disk did not read"
  grep -q "disk-test: ok" /tmp/disk.out || fail "disk: the guest's disk test failed"
  e2fsck -fn "$d/root.img" >/tmp/disk.fsck 2>&1 || { cat /tmp/disk.fsck; fail "disk: root.img is not clean"; }
  got=$(debugfs -R "cat /hello.txt" "$d/root.img" 2>/dev/null)
  [ "$got" = "written by the guest through virtio-blk" ] || fail "disk: /hello.txt in root.img reads \"$got\""
  [ "$(sha256sum <"$d/data.img")" = "$data_sum" ] || fail "disk: the read-only image changed"
  after=$(stat -c %b "$d/root.img")
  # 512-byte blocks: the 16 MiB the guest wrote and freed were punched out
  [ $((after - before)) -lt 16384 ] ||
    fail "disk: root.img grew by $(((after - before) / 2)) KiB: the discarded 16 MiB were not punched out"
  disk_growth=$(((after - before) / 2))

  # a 2-node pod: the devices on node 0, the guest's buffers faulted in
  # through the page engine
  boot diskpod /vmlinuz 'sh -c "echo pod >/pod.txt && sync"' --timeout 300 \
    --disk "$d/root.img" --nodes 2 --fabric shm $POD
  KARGS=
  [ "$status" = 0 ] || fail "disk on a pod: shoal exited with status $status"
  e2fsck -fn "$d/root.img" >/tmp/diskpod.fsck 2>&1 || { cat /tmp/diskpod.fsck; fail "disk on a pod: root.img is not clean"; }
  [ "$(debugfs -R "cat /pod.txt" "$d/root.img" 2>/dev/null)" = pod ] || fail "disk on a pod: /pod.txt did not read back"
  [ "$(debugfs -R "cat /hello.txt" "$d/root.img" 2>/dev/null)" = "written by the guest through virtio-blk" ] ||
    fail "disk on a pod: the earlier file is gone"
  rm -rf "$d"
  echo "linux-guest: ok: virtio disks: ext4 root written and read back (clean), read-only disk unwritten, 16 MiB" \
    "freed and trimmed left the image $disk_growth KiB bigger; on a 2-node pod too"
}

# The balloon (free page reporting): memfill 192 MiB in a 320 MiB guest
# (in 256 MiB this kernel and initramfs leave 177 MiB available: memfill
# 192 is killed for want of memory, balloon or not), then the guest frees it (memfill exits); Linux reports the free 2 MiB
# chunks about 2 s later, and they become dormant again. Here: within 10 s
# of the first memfill's end, the nodes' RSS (shoal and a pod's members)
# drops by at least 150 MiB; the counters say the guest reported and the
# nodes re-dormanted at least 150 MiB (38400 pages); a second memfill of
# 192 MiB still verifies (freed pages come back as zeros, zero-filled
# where they are touched). $BALLOON_TIMES, when set, names a file that gets
# one line per run: name, RSS before and lowest in 10 s (KiB), seconds to
# the 150 MiB drop, pages reported and re-dormanted.
# rss: the RSS of every shoal process (node 0 and a pod's members; the
# harness runs nothing else called shoal), KiB
rss() {
  total=0
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = shoal ] || continue
    r=$(awk '/^VmRSS:/ { print $2 }' "$d/status" 2>/dev/null)
    total=$((total + ${r:-0}))
  done
  echo "$total"
}
# centis: the uptime in hundredths of a second
centis() { u=$(cut -d' ' -f1 /proc/uptime); echo "${u%.*}${u#*.}"; }
balloon_run() {
  name=$1; shift
  out=/tmp/$name.out
  : >"$out"
  timeout -k 10 600 shoal run --kernel /vmlinuz --initrd /initrd.img --memory 320M \
    --cmdline "$BASE -- sh -c \"memfill 192 && sleep 12 && memfill 192\"" \
    --metrics-json "/tmp/$name.json" "$@" >"$out" 2>"/tmp/$name.err" &
  ROOTPID=$!
  i=0
  until grep -q "memfill: verified 192 MiB" "$out"; do
    kill -0 "$ROOTPID" 2>/dev/null || { cat "$out"; tail -3 "/tmp/$name.err"; fail "$name: shoal ended before memfill verified"; }
    i=$((i + 1)); [ "$i" -lt 3000 ] || fail "$name: no memfill within 600 s"
    sleep 0.2
  done
  before=$(rss); drop=0; t0=$(centis); t=$t0; low=$before; took=
  # every 0.2 s for 10 s: has the RSS dropped by 150 MiB (153600 KiB)?
  # (for the benchmark, $BALLOON_TIMES, the whole 10 s: the lowest RSS)
  while [ $((t - t0)) -lt 1000 ]; do
    now=$(rss); [ "$now" -lt "$low" ] && low=$now
    if [ -z "$took" ] && [ $((before - now)) -ge 153600 ]; then
      drop=1; took=$(((t - t0) / 100)).$(printf %02d $(((t - t0) % 100)))
      [ -n "${BALLOON_TIMES:-}" ] || break
    fi
    sleep 0.2; t=$(centis)
  done
  status=0; wait "$ROOTPID" || status=$?
  cat "$out"; tail -n 3 "/tmp/$name.err" >&2
  [ "$status" = 0 ] || fail "$name: shoal exited with status $status"
  [ "$drop" = 1 ] || fail "$name: RSS went from $before KiB only down to $low KiB within 10 s of the free"
  [ "$(grep -c "memfill: verified 192 MiB" "$out")" = 2 ] || fail "$name: the second memfill did not verify"
  [ "$(metric "$name" pages_reported 1)" -ge 38400 ] || fail "$name: the guest reported too few pages"
  [ "$(metric "$name" pages_redormanted 1)" -ge 38400 ] || fail "$name: too few pages became dormant again"
  [ "$(metric "$name" bytes_fabric_read 1)" = 0 ] || fail "$name: page bytes crossed the fabric"
  echo "linux-guest: $name: RSS $before KiB, 150 MiB less $took s after the free, lowest $low KiB;" \
    "reported $(metric "$name" pages_reported 1), re-dormanted $(metric "$name" pages_redormanted 1) pages"
  [ -z "${BALLOON_TIMES:-}" ] || echo "$name $before $low $took $(metric "$name" pages_reported 1)" \
    "$(metric "$name" pages_redormanted 1)" >>"$BALLOON_TIMES"
}
balloon() {
  balloon_run balloon --timeout 600
  # a pod: half the blocks are homed on node 1, so their frees go through
  # it (the pod with --node-memory, where node 1 holds pages the guest
  # frees, is podmem in the pods section: 192 MiB on an evicting pod takes minutes under
  # this harness's nested KVM)
  balloon_run balloonpod --timeout 600 --nodes 2 --fabric shm $POD
  [ "$(metric balloonpod messages_received 3)" -gt 0 ] || fail "balloonpod: node 1 took no part"
}

# one node: the bzImage as shoal boots it by default (its vmlinux
# decompressed here, entered through its PVH entry), the bzImage through
# the 64-bit boot protocol (its own decompressor in the guest), the ELF
# vmlinux through its PVH entry; a guest's status; how a guest ends
one() {
vmlinux_bytes=$(stat -c %s /vmlinux)
for k in one:/vmlinuz:auto boot64:/vmlinuz:boot64 pvh:/vmlinux:auto; do
  n=${k%%:*}; rest=${k#*:}; kernel=${rest%%:*}; entry=${rest#*:}
  boot "$n" "$kernel" "/bin/memfill 64" --timeout 300 $NOBALLOON --bzimage-entry "$entry"
  [ "$status" = 0 ] || fail "$n: shoal exited with status $status"
  # the decompressed vmlinux is, byte for byte, build.sh's (extracted the same way)
  want=0
  [ "$n" = one ] && want=$vmlinux_bytes
  [ "$(metric "$n" kernel_decompressed_bytes 1)" = "$want" ] ||
    fail "$n: kernel_decompressed_bytes $(metric "$n" kernel_decompressed_bytes 1), not $want"
  grep -q "memfill: verified 64 MiB" "/tmp/$n.out" || fail "$n: memfill did not verify"
  grep -q "shoal-init: exit status 0" "/tmp/$n.out" || fail "$n: init did not report status 0"
  # init's `poweroff -f`: the kernel found ACPI's S5 (without it, it says "System halted")
  grep -q "reboot: Power down" "/tmp/$n.out" || fail "$n: the kernel did not power off through ACPI"
  [ "$(metric "$n" bytes_fabric_read 1)" = 0 ] || fail "$n: bytes on a fabric"
  [ "$(metric "$n" pages_zero_filled 1)" -gt 16384 ] || fail "$n: fewer pages zero-filled than memfill touched"
done
# the bzImage's own decompressor writes the kernel image into guest memory
# itself, and its scratch beside it: first touches (zero-fills) where the
# default entry loads the image's non-zero pages instead. So boot64 zero-
# fills more than those pages more (less the bzImage's own that it loads),
# the rest being its scratch (Debian's: 8 178 to 10 226 pages more against
# 5 616; by how much more varies with where the decompressor puts the
# kernel). Strictly more: were the default entry boot64 too, both are 0.
scratch=$(($(metric boot64 pages_zero_filled 1) - $(metric one pages_zero_filled 1)))
image=$(($(metric one pages_loaded 1) - $(metric boot64 pages_loaded 1)))
[ "$scratch" -gt "$image" ] ||
  fail "boot64 zero-filled only $scratch pages more than the default entry, not more than the $image image pages"
# Debian's vmlinux has 6 947 all-zero pages in its loaded file bytes
# (.bss, .brk, .init.scratch): punched, not loaded
for n in one pvh; do
  [ "$(metric "$n" pages_loaded_zero 1)" -ge 6000 ] || fail "$n: only $(metric "$n" pages_loaded_zero 1) zero pages left dormant"
done

boot status /vmlinuz /bin/false
[ "$status" = 1 ] || fail "/bin/false's status 1 came back as $status"

# How a guest ends shoal (docs/guest-abi.md): `poweroff -f` through ACPI
# (S5 in the PM1 control register) with status 0, `reboot -f` (the FADT's
# reset register, the i8042's reset line) with status 0, and a kernel
# panic with panic=-1 (a reset) with status 0. Init's own end is not
# reached in any of them. --timeout makes a VM that does not end fail
# with 124 instead of hanging the harness.
ends=""
for e in "poweroff:poweroff -f:reboot: Power down" "reboot:reboot -f:reboot: Restarting system" \
  'panic:sh -c "echo c >/proc/sysrq-trigger":Kernel panic - not syncing'; do
  n=${e%%:*}; rest=${e#*:}; cmd=${rest%%:*}; says=${rest#*:}
  boot "$n" /vmlinuz "$cmd" --timeout 300
  [ "$status" = 0 ] || fail "$n: shoal exited with status $status, not 0"
  grep -q "$says" "/tmp/$n.out" || fail "$n: the kernel did not say \"$says\""
  if grep -q "shoal-init: exit status" "/tmp/$n.out"; then fail "$n: the command returned to init"; fi
  ends="$ends $n:$status"
done
# `halt -f`: the kernel stops every CPU with interrupts off, which KVM
# keeps inside KVM_RUN (no exit tells shoal); shoal asks the vCPUs twice a
# second whether they stopped for good and ends the VM with status 0. Not
# at --timeout: shoal ends within seconds of the halt (its wall time less
# the guest's uptime at init is what a boot takes, not the 150 s). (Before
# shoal ended halted guests, a nested guest left halted for 150 s wedged
# the harness's next boot, every time.)
boot halt /vmlinuz "halt -f" --timeout 150
[ "$status" = 0 ] || fail "halt: shoal exited with status $status, not 0"
grep -q "reboot: System halted" /tmp/halt.out || fail "halt: the kernel did not say \"reboot: System halted\""
up=$(sed -n 's/^shoal-init: up \([0-9.]*\).*/\1/p' /tmp/halt.out | head -1)
wall=$(grep -m1 '"wall_seconds"' /tmp/halt.json | tr -dc '0-9.')
awk -v w="$wall" -v u="$up" 'BEGIN { exit !(w - u < 40) }' ||
  fail "halt: shoal ran $wall s for a guest that halted $up s after it booted"
ends="$ends halt:$status"
echo "linux-guest: ok: one node (bzImage through PVH and through its decompressor, vmlinux through PVH; powered off through ACPI), exit status, ends (status)$ends"
}

pods() {
# a 2-node pod: blocks homed on both nodes. Dormant pages are zero-filled
# where they are touched (no page bytes on the wire); with dormant pages
# off every page has contents at its home and node 0 pulls the ones homed
# on node 1; with --node-memory below what the guest touches, pages move
# both ways. ci/test.sh gives the harness one CPU for these boots (see
# there).
boot pod /vmlinuz "/bin/memfill 64" --nodes 2 --fabric shm $POD $NOBALLOON
[ "$status" = 0 ] || fail "pod: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/pod.out || fail "pod: memfill did not verify"
[ "$(metric pod bytes_fabric_read 1)" = 0 ] || fail "pod: page bytes crossed with dormant pages on"
[ "$(metric pod pages_zero_filled 2)" -gt 16384 ] || fail "pod: node 0 zero-filled too few pages"

boot podoff /vmlinuz "/bin/memfill 64" --nodes 2 --fabric shm $POD --dormant off
[ "$status" = 0 ] || fail "pod, dormant off: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/podoff.out || fail "pod, dormant off: memfill did not verify"
fetched=$(metric podoff remote_fetches 1)
bytes=$(metric podoff bytes_fabric_read 1)
[ "$fetched" -gt 0 ] || fail "pod, dormant off: no page crossed"
[ "$bytes" = $((fetched * 4096)) ] || fail "pod, dormant off: $bytes bytes on the wire for $fetched pages"
[ "$(metric podoff pages_zero_filled 1)" = 0 ] || fail "pod, dormant off: pages were zero-filled"

# 96 MiB per node, less than the kernel and memfill touch together: node 0
# evicts to node 1 (the oldest pages first: the boot's) and pulls pages
# back as the guest touches them again. The guest waits 8 s after memfill:
# what it freed by then (the boot's pages among them) is reported to the
# balloon, and node 1, which holds some of it, drops it (node 1 evicts
# nothing, so every page it re-dormants is one the guest freed)
# (through the guest's decompressor: its scratch is part of what moves)
boot podmem /vmlinuz 'sh -c "memfill 64 && sleep 8"' --nodes 2 --fabric shm $POD --node-memory 96M \
  --bzimage-entry boot64
[ "$status" = 0 ] || fail "pod, 96 MiB a node: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/podmem.out || fail "pod, 96 MiB a node: memfill did not verify"
evicted=$(metric podmem pages_evicted 1)
back=$(metric podmem remote_fetches 2)
[ "$evicted" -gt 0 ] || fail "pod, 96 MiB a node: nothing was evicted"
[ "$back" -gt 0 ] || fail "pod, 96 MiB a node: node 0 pulled nothing back"
[ "$(metric podmem pages_resident 2)" -le 24576 ] || fail "pod, 96 MiB a node: node 0 holds more than 96 MiB"
[ "$(metric podmem pages_evicted 3)" = 0 ] || fail "pod, 96 MiB a node: node 1 evicted"
[ "$(metric podmem pages_redormanted 3)" -gt 0 ] || fail "pod, 96 MiB a node: node 1 dropped no page the guest freed"
fetches=$(metric podmem remote_fetches 1)
[ "${fetches:-0}" -gt 0 ] || fail "pod, 96 MiB a node: no remote fetches counted"
[ "$(metric podmem bytes_fabric_read 1)" = $((fetches * 4096)) ] ||
  fail "pod, 96 MiB a node: bytes on the wire are not 4096 x remote fetches"

# the PVH entry on a pod: the vmlinux's segments are the loader's pages
boot pvhpod /vmlinux "/bin/memfill 64" --nodes 2 --fabric shm $POD $NOBALLOON
[ "$status" = 0 ] || fail "pod, PVH: shoal exited with status $status"
grep -q "memfill: verified 64 MiB" /tmp/pvhpod.out || fail "pod, PVH: memfill did not verify"
[ "$(metric pvhpod bytes_fabric_read 1)" = 0 ] || fail "pod, PVH: page bytes crossed with dormant pages on"

echo "linux-guest: ok: a 2-node pod (bzImage; PVH) with $(metric pod pages_zero_filled 1) pages" \
  "zero-filled and 0 bytes on the wire, with dormant pages off $fetched pages ($bytes bytes) pulled, and with" \
  "96 MiB a node $evicted pages evicted and $back pulled back"
}

# `linux-guest smp`: two vCPUs, found through the ACPI tables, for both
# entries. ci/test.sh runs it only with LINUX_SMP=1, in a harness of its own
# with two CPUs: in the harness's QEMU (TCG) nested KVM hangs such boots now
# and then (a CPU of the QEMU guest stays inside the nested guest for good;
# its kernel reports a soft lockup in shoal-vcpu0), pinned vCPU threads or
# not; one-vCPU boots never did that.
if [ "${1:-}" = smp ]; then
  for k in smp:/vmlinuz smppvh:/vmlinux; do
    n=${k%%:*}
    # (the bzImage through its own decompressor; the vmlinux through PVH)
    boot "$n" "${k#*:}" "/bin/memfill 64" --cpus 2 --pin $NOBALLOON --bzimage-entry boot64
    [ "$status" = 0 ] || fail "$n: shoal exited with status $status"
    grep -q "shoal-init: up .*, 2 CPUs online" "/tmp/$n.out" || fail "$n: the kernel did not bring up both vCPUs"
    grep -q "memfill: verified 64 MiB" "/tmp/$n.out" || fail "$n: memfill did not verify"
  done
  echo "linux-guest: ok: 2 vCPUs online and memfill verified, as a bzImage and through PVH"
  exit 0
fi

# `linux-guest SECTION...` runs those sections (one, pods, disks, balloon),
# none named: all of them. ci/test.sh runs each in a harness of its own, so
# that a harness that wedges costs one section, not all of them.
[ $# -gt 0 ] || set -- one pods disks balloon
for section in "$@"; do
  case $section in
    one | pods | disks | balloon) "$section" ;;
    *) fail "no section $section (one, pods, disks, balloon, smp)" ;;
  esac
done
