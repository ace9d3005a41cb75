#!/usr/bin/env bash
# Builds what a Linux guest of shoal needs, from Debian's packages, into
# OUT (default /var/tmp/shoal-linux/out):
#   vmlinuz      Debian's stock kernel (bzImage), from linux-image-amd64
#   vmlinux      the same kernel as an ELF file (for its PVH entry)
#   initrd.img   busybox-static, guest-images/linux/init and memfill, and
#                the kernel's modules for virtio disks, the balloon and ext4 (virtio,
#                virtio_ring, virtio_mmio, virtio_blk, virtio_balloon, ext4 and what they
#                depend on), which Debian builds as modules
# Packages are fetched with apt-get download and unpacked, never installed,
# and nothing here is committed. Needs gcc (static libc), cpio, xz, apt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${SHOAL_LINUX_DIR:-/var/tmp/shoal-linux}
out=${1:-$work/out}
say() { echo "[linux-guest] $*" >&2; }
die() { say "error: $*"; exit 1; }
mkdir -p "$work" "$out"

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || die "cannot resolve Debian's kernel package (run apt-get update?)"
kver=${kpkg#linux-image-}
debs=$work/debs
if ! ls "$debs/${kpkg}"_*.deb >/dev/null 2>&1 || ! ls "$debs"/busybox-static_*.deb >/dev/null 2>&1; then
  say "fetching $kpkg and busybox-static"
  rm -rf "$debs"; mkdir -p "$debs"; chmod 0777 "$debs"
  (cd "$debs" && apt-get download -qq "$kpkg" busybox-static 2>&1 | { grep -v -i unsandboxed || true; }) ||
    die "apt-get download failed (run apt-get update?)"
fi
kroot=$work/kernel-$kver
if [ ! -f "$kroot/.complete" ]; then
  rm -rf "$kroot"; dpkg-deb -x "$debs/${kpkg}"_*.deb "$kroot"
  touch "$kroot/.complete"
fi
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
if [ ! -s "$out/vmlinux" ] || [ "$out/vmlinux" -ot "$out/vmlinuz" ]; then
  off=$({ LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$out/vmlinuz" || true; } | head -1 | cut -d: -f1)
  [ -n "$off" ] || die "no xz payload in $out/vmlinuz"
  tail -c +$((off + 1)) "$out/vmlinuz" > "$work/payload.xz"
  xz -dcq --single-stream "$work/payload.xz" > "$out/vmlinux" 2>/dev/null || true
  [ "$(head -c4 "$out/vmlinux" | tail -c3)" = ELF ] || die "could not extract vmlinux from $out/vmlinuz"
fi

root=$work/initramfs
rm -rf "$root"; mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp}
bb=$work/busybox
[ -x "$bb/bin/busybox" ] || { rm -rf "$bb"; dpkg-deb -x "$debs"/busybox-static_*.deb "$bb"; }
cp "$bb/bin/busybox" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
done
cp "$here/init" "$root/init"
# Modules, from the same kernel package, and the order init loads them in:
# each after what `modinfo -F depends` names (ext4 and jbd2 also want a
# crc32c shash, a soft dependency: crc32c_generic, before them).
moddir=$kroot/lib/modules/$kver
mkdir -p "$root/lib/modules"
: > "$root/lib/modules/load-order"
add_module() { # name: its dependencies first, then itself, once
  local name=$1 ko dep
  grep -qx "$name" "$root/lib/modules/load-order" && return 0
  ko=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) | head -1)
  [ -n "$ko" ] || die "module $name is not in $kpkg"
  for dep in $(modinfo -F depends "$ko" | tr ',' ' '); do add_module "$dep"; done
  cp "$ko" "$root/lib/modules/$name.ko"
  echo "$name" >> "$root/lib/modules/load-order"
}
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_balloon crc32c_generic ext4; do add_module "$m"; done
gcc -static -O2 -o "$root/bin/memfill" "$here/memfill.c"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img"
say "kernel $kver: $out/vmlinuz, $out/vmlinux; initramfs: $out/initrd.img ($(du -k "$out/initrd.img" | cut -f1) KiB;" \
  "modules: $(tr '\n' ' ' < "$root/lib/modules/load-order"))"
