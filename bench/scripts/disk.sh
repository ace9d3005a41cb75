#!/usr/bin/env bash
# virtio-blk throughput: sequential dd in a Linux guest on shoal against
# the same dd on the host's file, inside the soft-RoCE harness's QEMU/TCG
# (one CPU) with the guest under nested KVM: compare ratios, not times.
#
# The disk is a 128 MiB raw image on the harness's tmpfs. In the guest dd
# writes and reads /dev/vda with O_DIRECT (every block goes through the
# device, none stays in the guest's page cache), 4 KiB blocks over 32 MiB
# and 1 MiB blocks over 64 MiB; on the host the same dd writes and reads
# the image file (tmpfs has no O_DIRECT: the file is memory). The guest's
# dd script is a second, read-only disk, which the guest's shell reads as
# its script. Each run is timed with /proc/uptime (10 ms ticks) around dd.
# Writes bench/results/disk.{md,json}.
#
#   cargo build --release && bench/scripts/disk.sh
set -euo pipefail
. "$(dirname "$0")/linux-lib.sh"
tmp=$(mktemp -d /tmp/disk-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# the dd runs, for the guest (DEV=/dev/vda, direct I/O) and the host
cat >"$tmp/dd.sh" <<'DD'
# run WHERE NAME BYTES dd-args...: one line "DD WHERE NAME BYTES START END"
run() {
  where=$1; name=$2; bytes=$3; shift 3
  a=$(cut -d' ' -f1 /proc/uptime)
  dd "$@" 2>/dev/null || { echo "DD-FAILED $where $name"; return 1; }
  b=$(cut -d' ' -f1 /proc/uptime)
  echo "DD $where $name $bytes $a $b"
}
ddbench() { # WHERE TARGET [direct]
  w=$1; t=$2; o=; i=
  if [ "${3:-}" = direct ]; then o=oflag=direct; i=iflag=direct; fi
  run "$w" write-4k $((32 << 20)) if=/dev/zero of="$t" bs=4k count=8192 conv=notrunc $o
  run "$w" read-4k $((32 << 20)) if="$t" of=/dev/null bs=4k count=8192 $i
  run "$w" write-1m $((64 << 20)) if=/dev/zero of="$t" bs=1M count=64 conv=notrunc $o
  run "$w" read-1m $((64 << 20)) if="$t" of=/dev/null bs=1M count=64 $i
}
DD
{
  cat "$tmp/dd.sh"
  echo 'ddbench guest /dev/vda direct'
} >"$tmp/guest.sh"
# a disk image of whole sectors: the script, padded with newlines
size=$(stat -c %s "$tmp/guest.sh")
head -c $((4096 - size)) /dev/zero | tr '\0' '\n' >>"$tmp/guest.sh"

cat >"$tmp/inner" <<'IN'
#!/bin/sh
set -eu
. /usr/local/bin/dd.sh
img=/dev/shm/bench.img
exits() { grep '"vcpu_exits"' /tmp/m.json | head -1 | tr -dc 0-9; }
# the same boot without dd: the vCPU exits a boot costs by itself
rm -f "$img"; head -c $((128 << 20)) /dev/zero >"$img"
timeout 600 shoal run --kernel /vmlinuz --initrd /initrd.img --memory 256M --timeout 300 \
  --cmdline "console=ttyS0 panic=-1 pci=off i8042.noaux quiet -- /bin/true" --metrics-json /tmp/m.json \
  --disk "$img" --disk /usr/local/bin/guest.sh,readonly >/tmp/out 2>/tmp/err || { cat /tmp/out /tmp/err; exit 1; }
echo "EXITS 0 $(exits)"
for round in 1 2 3; do
  rm -f "$img"; head -c $((128 << 20)) /dev/zero >"$img"
  ddbench host "$img" | sed "s/^DD /DD $round /"
  timeout 600 shoal run --kernel /vmlinuz --initrd /initrd.img --memory 256M --timeout 300 \
    --cmdline "console=ttyS0 panic=-1 pci=off i8042.noaux quiet -- /bin/sh /dev/vdb" --metrics-json /tmp/m.json \
    --disk "$img" --disk /usr/local/bin/guest.sh,readonly >/tmp/out 2>/tmp/err || { cat /tmp/out /tmp/err; exit 1; }
  grep '^DD' /tmp/out | sed "s/^DD /DD $round /"
  echo "EXITS $round $(exits)"
  if grep -q DD-FAILED /tmp/out; then cat /tmp/out; exit 1; fi
done
IN
chmod +x "$tmp/inner"
rows=$(ci/softroce.sh --smp 1 --add "$shoal:/usr/local/bin/shoal" --add "$tmp/inner:/usr/local/bin/disk-bench" \
  --add "$tmp/dd.sh:/usr/local/bin/dd.sh" --add "$tmp/guest.sh:/usr/local/bin/guest.sh" \
  --add "$linux_out/vmlinuz:/vmlinuz" --add "$linux_out/initrd.img:/initrd.img" -- disk-bench | grep -E '^(DD|EXITS) ')
echo "$rows"
exits=$(echo "$rows" | grep '^EXITS ')
rows=$(echo "$rows" | grep '^DD ')
# vCPU exits a dd block costs: a round's boot less the boot without dd,
# over the blocks (8192 + 8192 of 4 KiB, 64 + 64 of 1 MiB)
per_block=$(echo "$exits" | awk '$2 == 0 {base = $3} $2 > 0 {printf "%s%.2f", (n++ ? " " : ""), ($3 - base) / 16512}')
# per run: MB/s (MiB/s) of each round; the median of three, and the ratio
# of the medians
table=$(echo "$rows" | awk '
  # DD ROUND WHERE NAME BYTES START END
  { mbps = ($5 / 1048576) / ($7 - $6); k = $4 " " $3; v[k] = v[k] " " mbps
    blk = ($4 ~ /4k/) ? 4096 : 1048576; ms[k] = ms[k] " " 1000 * ($7 - $6) / ($5 / blk) }
  function med(s,   a, n) { n = split(s, a, " "); if (n < 3) return a[1];
    if ((a[1] <= a[2] && a[2] <= a[3]) || (a[3] <= a[2] && a[2] <= a[1])) return a[2];
    if ((a[2] <= a[1] && a[1] <= a[3]) || (a[3] <= a[1] && a[1] <= a[2])) return a[1]; return a[3] }
  END { split("write-4k read-4k write-1m read-1m", order, " ");
    for (i = 1; i <= 4; i++) { n = order[i]; g = med(v[n " guest"]); h = med(v[n " host"]);
      printf "%s %.1f %.1f %.3f %.3f %.3f\n", n, g, h, g / h, med(ms[n " guest"]), med(ms[n " host"]) } }')
{
  echo "# virtio-blk throughput"
  echo
  echo "\`bench/scripts/disk.sh\`: sequential \`dd\` in a Linux guest on shoal (Debian's kernel, 256 MiB, one vCPU) on"
  echo "\`/dev/vda\` with O_DIRECT, beside the same \`dd\` on the host's image file (a 128 MiB raw image on tmpfs, no"
  echo "O_DIRECT there), inside the soft-RoCE harness's QEMU/TCG (one CPU) with the guest under nested KVM: compare ratios,"
  echo "not times. 4 KiB blocks over 32 MiB, 1 MiB blocks over 64 MiB; three rounds, medians (MiB/s)."
  echo
  echo "| run | guest MiB/s | host MiB/s | guest ÷ host | guest ms a block | host ms a block |"
  echo "|---|---|---|---|---|---|"
  echo "$table" | awk '{printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}'
  echo
  echo "A 4 KiB block of the guest's \`dd\` is one request (O_DIRECT, queue depth 1): the guest's write to the"
  echo "queue-notify register (an ioeventfd, handled in KVM), the device thread's \`preadv\`/\`pwritev\` straight into or"
  echo "out of guest memory, an irqfd interrupt, and the guest's interrupt handler reading and acknowledging the"
  echo "interrupt status (two MMIO exits to shoal). Under nested KVM on TCG each of those exits and wakeups costs far"
  echo "more than on hardware (not measured apart here), so small blocks are far from the host's file; a 1 MiB block"
  echo "spreads that cost over 256 times the data."
  echo
  echo "vCPU exits to shoal a dd block (a round's boot less the same boot running \`/bin/true\`, over its 16512"
  echo "blocks), each round: $per_block. The interrupt handler's status read and acknowledgement are two; a queue"
  echo "notification that reached shoal instead of its ioeventfd would be a third."
  echo
  echo "Rounds (MiB/s, guest then host):"
  echo
  echo "$rows" | awk '{printf "- round %s, %s, %s: %.1f\n", $2, $4, $3, ($5 / 1048576) / ($7 - $6)}'
} >"$out/disk.md"
echo "$table" | awk 'BEGIN{print "["} {printf "%s{\"run\":\"%s\",\"guest_mib_s\":%s,\"host_mib_s\":%s,\"ratio\":%s,\"guest_ms_per_block\":%s,\"host_ms_per_block\":%s}", (NR>1?",\n":""), $1,$2,$3,$4,$5,$6} END{print "\n]"}' >"$out/disk.json"
cat "$out/disk.md"
