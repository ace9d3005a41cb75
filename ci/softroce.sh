#!/usr/bin/env bash
# ci/softroce.sh: run a command on soft-RoCE (rdma_rxe) on a machine whose
# own kernel has no RDMA. Boots Debian's stock kernel in QEMU from a fresh
# initramfs, creates rxe0 on the loopback device, runs the command as root
# inside, and exits with its status.
#
#   ci/softroce.sh [options] -- COMMAND [ARGS...]
#
# Options:
#   --add SRC[:DST]   copy a host file into the guest (default DST:
#                     /usr/local/bin/NAME) with the shared libraries it
#                     needs; repeatable
#   --env NAME=VALUE  export to the command; repeatable
#   --mem MIB         guest memory (default 1024)
#   --smp N           guest CPUs (default 2)
#   --timeout S       bound on the whole VM (default 1200)
#
# Inside: RXE_DEV=rxe0, RXE_IP=127.0.0.1, RXE_GID_INDEX (the GID of
# RXE_IP), GUEST_KVM=1 when /dev/kvm works there (TCG offers SVM, so
# kvm_amd loads: nested KVM). The locked-memory limit is unlimited. ip and
# tc are there, with veth and sch_netem loaded (tc netem works).
# Exit status: the command's; 125 when the harness itself failed, also
# when the VM wedged: it prints a tick every 20 s, and nothing at all for
# 60 s (three ticks) means its clock or CPUs stopped (QEMU/TCG's nested KVM does that
# now and then under a Linux guest; see ci/test.sh), so QEMU is stopped
# then instead of at --timeout.
#
# Nothing is installed on the host beyond ci/packages.txt (QEMU, its
# firmware, busybox and the kernel are downloaded and unpacked under
# $SHOAL_SOFTROCE_WORK, default /var/tmp/shoal-softroce, and reused).
# Debian's qemu-system-x86 is unpacked, never installed: installing it here
# would replace the machine's newer qemu-utils.
set -euo pipefail

WORK=${SHOAL_SOFTROCE_WORK:-/var/tmp/shoal-softroce}
MEM=1024
SMP=2
TIMEOUT=1200
ADDS=()
ENVS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --add) ADDS+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "softroce: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "softroce: no command given (see --help)" >&2; exit 2; }
CMD=("$@")

say() { printf '[softroce %(%T)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 125; }

# resolve --add sources before changing directory
for i in ${ADDS[@]+"${!ADDS[@]}"}; do
  src=${ADDS[$i]%%:*}
  [ -e "$src" ] || { echo "softroce: --add $src: no such file" >&2; exit 2; }
  abs=$(realpath "$src")
  if [[ ${ADDS[$i]} == *:* ]]; then ADDS[$i]="$abs:${ADDS[$i]#*:}"
  else ADDS[$i]="$abs:/usr/local/bin/$(basename "$src")"; fi
done

mkdir -p "$WORK"
cd "$WORK"
exec 9>"$WORK/.lock"
flock -w 1800 9 || die "another softroce run holds $WORK/.lock"

download() { # dir pkg... : apt-get download into a dir apt's sandbox user can write
  local dir=$1; shift
  rm -rf "$dir"; mkdir -p "$dir"; chmod 0777 "$dir"
  (cd "$dir" && apt-get download -qq "$@" 2>&1 | { grep -v -i unsandboxed || true; }) ||
    die "apt-get download $* failed (run apt-get update?)"
}

# --- QEMU, firmware, busybox: unpacked once
QROOT=$WORK/qemu
if [ ! -f "$QROOT/.complete" ]; then
  say "fetching QEMU, firmware and busybox (unpacked under $QROOT)"
  download "$WORK/debs-qemu" qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static \
    libcapstone4 libfdt1 libslirp0 libpmem1 libdaxctl1 libndctl6 libvdeplug2 libusbredirparser1 libusb-1.0-0 \
    libspice-server1 libcacard0 libbrlapi0.8 libaio1 liburing2 libjpeg62-turbo libpng16-16 libsndio7.0 \
    libepoxy0 libgbm1 libvirglrenderer1 libopus0 libexecs0 liborc-0.4-0 libgstreamer-plugins-base1.0-0 || true
  # whatever else this host lacks, as apt resolves it
  apt-get install -y -qq --download-only --no-install-recommends -o Dir::Cache::archives="$WORK/debs-qemu" \
    qemu-system-x86 busybox-static >/dev/null 2>&1 || say "warning: apt could not resolve QEMU's dependencies"
  rm -rf "$QROOT"; mkdir -p "$QROOT"
  for d in "$WORK"/debs-qemu/*.deb; do dpkg-deb -x "$d" "$QROOT"; done
  touch "$QROOT/.complete"
fi
QEMU=(env "LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu"
      "QEMU_MODULE_DIR=$QROOT/usr/lib/x86_64-linux-gnu/qemu" "$QROOT/usr/bin/qemu-system-x86_64")
"${QEMU[@]}" --version >/dev/null 2>&1 || die "the unpacked QEMU does not run (a missing library?)"

# --- the kernel: Debian's stock one, unpacked once; vmlinux extracted so
# QEMU can boot it through its PVH entry (faster under TCG than bzImage)
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve Debian's kernel package (apt-get update?)"
KVER=${KPKG#linux-image-}
KROOT=$WORK/kernel-$KVER
if [ ! -f "$KROOT/.complete" ]; then
  say "fetching $KPKG"
  download "$WORK/debs-kernel" "$KPKG"
  rm -rf "$KROOT"; dpkg-deb -x "$WORK"/debs-kernel/"$KPKG"_*.deb "$KROOT"
  depmod -b "$KROOT" "$KVER"
  off=$({ LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$KROOT/boot/vmlinuz-$KVER" || true; } | head -1 | cut -d: -f1)
  # (through a file: in a pipe, tail dies of SIGPIPE when xz stops at the
  # end of the stream, and pipefail counts that as failure)
  if [ -n "$off" ] && tail -c +$((off + 1)) "$KROOT/boot/vmlinuz-$KVER" > "$KROOT/boot/payload.xz" &&
     xz -dcq --single-stream "$KROOT/boot/payload.xz" > "$KROOT/boot/vmlinux" 2>/dev/null &&
     [ "$(head -c4 "$KROOT/boot/vmlinux" | tail -c3)" = ELF ]; then :
  else rm -f "$KROOT/boot/vmlinux"; say "no vmlinux extracted: booting the bzImage"; fi
  rm -f "$KROOT/boot/payload.xz"
  touch "$KROOT/.complete"
fi
KERNEL=$KROOT/boot/vmlinux
[ -f "$KERNEL" ] || KERNEL=$KROOT/boot/vmlinuz-$KVER

# --- the initramfs
ROOT=$WORK/root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc,proc,sys,dev,tmp,run,root}
for l in bin sbin lib lib64; do ln -s usr/$l "$ROOT/$l"; done
chmod 1777 "$ROOT/tmp"
copy() { # src [dst]
  mkdir -p "$ROOT$(dirname "${2:-$1}")"
  cp -L --preserve=mode "$1" "$ROOT${2:-$1}"
}
copy_elf() { # src [dst]: plus the libraries ldd names (none for a script)
  copy "$@"
  local lib
  { ldd "$1" 2>/dev/null || true; } | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    [ -e "$ROOT$lib" ] || copy "$lib"
  done
}
cp "$QROOT/bin/busybox" "$ROOT/usr/bin/busybox"
for a in $("$ROOT/usr/bin/busybox" --list-full); do
  [ -e "$ROOT/$a" ] || ln -s /usr/bin/busybox "$ROOT/$a"
done
for b in ibv_devices ibv_devinfo ib_read_lat ib_read_bw rdma ip tc; do
  rm -f "$ROOT/usr/bin/$b" "$ROOT/usr/sbin/$b"
  p=$(command -v "$b" || true)
  [ -n "$p" ] || die "$b not found: run ci/install-deps.sh"
  copy_elf "$p" "/usr/bin/$b"
done
copy_elf "$(dpkg -L ibverbs-providers | grep -m1 '/librxe-rdmav[0-9]*\.so$')"
copy /etc/libibverbs.d/rxe.driver
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
# modules: rxe and its closure, crc32_generic (rxe's ICRC needs the crc32
# shash, which modules.dep does not list), kvm_amd for nested KVM, veth and
# sch_netem for pods across network namespaces with injected faults (the
# development machine's kernel has no netem)
for m in rdma_rxe crc32_generic kvm_amd veth sch_netem; do
  modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod" {print $2}'
done | sort -u | while read -r ko; do copy "$ko" "/lib/modules/$KVER/${ko#*/lib/modules/"$KVER"/}"; done
for f in modules.order modules.builtin modules.builtin.modinfo; do
  copy "$KROOT/lib/modules/$KVER/$f" "/lib/modules/$KVER/$f"
done
depmod -b "$ROOT" "$KVER"
for spec in ${ADDS[@]+"${ADDS[@]}"}; do copy_elf "${spec%%:*}" "${spec#*:}"; done
{
  echo '#!/bin/sh'
  for e in ${ENVS[@]+"${ENVS[@]}"}; do printf 'export %q\n' "$e"; done
  printf 'exec'; printf ' %q' "${CMD[@]}"; echo
} > "$ROOT/etc/command"
chmod 0755 "$ROOT/etc/command"
cat > "$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/bin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
fail() { echo "@@SOFTROCE setup failed: $*"; echo "@@SOFTROCE_STATUS=125"; poweroff -f; }
ulimit -l unlimited
ip link set lo up
modprobe crc32_generic || fail "modprobe crc32_generic"
modprobe rdma_rxe || fail "modprobe rdma_rxe"
GUEST_KVM=0
grep -qw svm /proc/cpuinfo && modprobe kvm_amd 2>/dev/null && [ -c /dev/kvm ] && GUEST_KVM=1
modprobe veth || fail "modprobe veth"
modprobe sch_netem || fail "modprobe sch_netem"
rdma link add rxe0 type rxe netdev lo || fail "rdma link add rxe0"
RXE_GID_INDEX=
for i in $(seq 0 15); do
  [ "$(cat /sys/class/infiniband/rxe0/ports/1/gids/$i 2>/dev/null)" = 0000:0000:0000:0000:0000:ffff:7f00:0001 ] &&
    { RXE_GID_INDEX=$i; break; }
done
[ -n "$RXE_GID_INDEX" ] || fail "no GID for 127.0.0.1 on rxe0"
export RXE_DEV=rxe0 RXE_IP=127.0.0.1 RXE_GID_INDEX GUEST_KVM
echo "@@SOFTROCE ready: rxe0 gid $RXE_GID_INDEX, nested KVM $GUEST_KVM, up $(cut -d' ' -f1 /proc/uptime) s"
# a sign of life for the host: silence means the VM's clock stopped
( while sleep 20; do echo "@@SOFTROCE tick"; done ) &
cd /tmp
status=0
/etc/command </dev/null || status=$?
echo "@@SOFTROCE_STATUS=$status"
poweroff -f
EOF
chmod 0755 "$ROOT/init"
INITRD=$WORK/initramfs.cpio.gz
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$INITRD"

# --- boot under TCG (this machine's KVM emulates and lacks SVM for the
# guest); console on the serial port, markers parsed as lines arrive.
# tsc=reliable: TCG's TSCs look unsynchronised, the kernel would fall back
# to the HPET, and every clock_gettime would be an emulated MMIO read of
# several microseconds (measured: it skewed 4 KiB read latencies by ~10 us)
# nohz=off highres=off lapic=notscdeadline: a periodic tick from the
# local APIC timer in periodic mode. With the default one-shot TSC-deadline
# timer, the QEMU guest running nested KVM guests stopped for good now and
# then (on 2026-12-05 in most runs of the Linux boots, at any boot, once
# before the first printed anything): QEMU idle, the guest's clock and its
# ticks stopped, as if one timer interrupt was lost on a way out of a
# nested guest and no timer was armed again. With a periodic timer a lost
# interrupt costs one tick: with these the Linux boots ran without a wedge.
TICK="nohz=off highres=off lapic=notscdeadline"
say "booting $(basename "$KERNEL") (${MEM} MiB, $SMP CPUs, TCG)"
LOG=$WORK/console.log
PIDFILE=$WORK/qemu.pid
STALL=60
status=
wedged=
start=$SECONDS
rm -f "$PIDFILE"
while :; do
  rc=0
  IFS= read -r -t "$STALL" line || rc=$?
  if [ "$rc" -gt 128 ]; then
    # no line, not even a tick, for $STALL s: the VM's clock or CPUs stopped
    wedged=1
    kill -KILL "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null || true
    break
  fi
  [ "$rc" = 0 ] || [ -n "$line" ] || break
  line=${line%$'\r'}
  printf '%s\n' "$line" >> "$LOG"
  case $line in
    *@@SOFTROCE_STATUS=*) status=${line##*@@SOFTROCE_STATUS=} ;;
    *'@@SOFTROCE tick'*) ;;
    *@@SOFTROCE*|*'Kernel panic'*) printf '%s\n' "${line#*@@}" >&2 ;;
    *) [ -n "${ready:-}" ] && printf '%s\n' "$line" ;;
  esac
  case $line in *'@@SOFTROCE ready'*) ready=1 ;; esac
  [ "$rc" = 0 ] || break
done < <(: > "$LOG"; timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" \
           -L "$QROOT/usr/share/qemu" -L "$QROOT/usr/share/seabios" \
           -accel tcg -cpu max -m "$MEM" -smp "$SMP" \
           -kernel "$KERNEL" -initrd "$INITRD" \
           -append "console=ttyS0 panic=-1 oops=panic quiet loglevel=3 tsc=reliable clocksource=tsc $TICK" \
           -pidfile "$PIDFILE" \
           -nographic -no-reboot -nic none -monitor none -serial stdio </dev/null 2>&1)
if [ -n "$wedged" ]; then
  say "the VM printed nothing for $STALL s, not even its tick: it wedged (its clock or CPUs stopped); stopped it"
fi
say "VM ran $((SECONDS - start)) s"
if [ -z "$status" ]; then
  say "the guest never reported a status; console log: $LOG"
  tail -n 30 "$LOG" >&2
  exit 125
fi
exit "$status"
