#!/bin/bash
# Build the e2e images from Debian packages (fetched with apt-get download,
# cached under $E2E_CACHE, never committed):
#   l2-initrd.cpio  busybox, virtio modules, the test agent (l2-init), memcheck
#   l1-initrd.cpio  busybox, kvm modules, mdvm + its shared libraries, the L2
#                   kernel (bzImage and the vmlinux inside it, for PVH), L2 initrd
# Usage: build.sh MDVM_BINARY  (prints the cache directory)
#        build.sh --fetch       (only fetch and unpack: $cache/vmlinuz, $cache/vmlinux)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fetch_only=; [ "${1:-}" = --fetch ] && fetch_only=1
[ -n "$fetch_only" ] || mdvm=$(realpath "$1")
cache=${E2E_CACHE:-$here/../../.e2e-cache}
mkdir -p "$cache/debs"
cache=$(realpath "$cache")
cd "$cache"

# ---- packages: the kernel linux-image-amd64 points at, and busybox
kpkg_name=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg_name" ] || { echo "e2e: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
kver=${kpkg_name#linux-image-}
if ! ls debs/"$kpkg_name"_*.deb >/dev/null 2>&1 || ! ls debs/busybox-static_*.deb >/dev/null 2>&1; then
	(cd debs && apt-get download "$kpkg_name" busybox-static >&2)
fi
if [ ! -f "kpkg/boot/vmlinuz-$kver" ]; then
	rm -rf kpkg && mkdir kpkg && dpkg-deb -x debs/"$kpkg_name"_*.deb kpkg
fi
if [ ! -x bb/bin/busybox ]; then
	rm -rf bb && mkdir bb && dpkg-deb -x debs/busybox-static_*.deb bb
fi
vmlinuz=kpkg/boot/vmlinuz-$kver
moddir=kpkg/lib/modules/$kver/kernel
ln -sf "$vmlinuz" vmlinuz

# ---- the uncompressed vmlinux inside the bzImage (setup header payload_offset/length: XZ)
if [ ! -f vmlinux ] || [ vmlinux -ot "$vmlinuz" ]; then
	/usr/bin/python3 - "$vmlinuz" <<'PY'
import struct, sys, lzma
d = open(sys.argv[1], "rb").read()
setup = (d[0x1f1] or 4) + 1
off, length = struct.unpack_from("<II", d, 0x248)
payload = d[setup * 512 + off: setup * 512 + off + length]
out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
assert out[:4] == b"\x7fELF", "payload is not an ELF"
open("vmlinux", "wb").write(out)
PY
fi

[ -z "$fetch_only" ] || { echo "$cache"; exit 0; }

# Everything the images are made of: this script (module lists), the inits,
# the guest programs, mdvm and the shared libraries it loads, the kernel.
stamp_inputs() {
	cat "$here"/build.sh "$here"/l2-init "$here"/l1-init "$here"/memcheck.c "$here"/poison.c "$mdvm" "$vmlinuz" \
		$(ldd "$mdvm" | awk '/=>/ {print $3} /ld-linux/ {print $1}') | md5sum | cut -c1-32
}
stamp=$(stamp_inputs)
if [ -f l1-initrd.cpio ] && [ "$(cat stamp 2>/dev/null)" = "$stamp" ]; then
	echo "$cache"; exit 0
fi

add_busybox() {   # root
	mkdir -p "$1"/bin "$1"/proc "$1"/sys "$1"/dev "$1"/tmp "$1"/mods
	cp bb/bin/busybox "$1"/bin/busybox
	ln -sf busybox "$1"/bin/sh
}

# ---- L2: stock kernel's virtio modules, busybox, the agent, memcheck
rm -rf l2root && add_busybox l2root
for m in virtio/virtio virtio/virtio_ring virtio/virtio_mmio virtio/virtio_balloon; do
	cp "$moddir/drivers/$m.ko" l2root/mods/
done
cp "$here"/l2-init l2root/init
chmod +x l2root/init
gcc -static -O2 -o l2root/bin/memcheck "$here"/memcheck.c
gcc -static -O2 -o l2root/bin/poison "$here"/poison.c
(cd l2root && find . | ./bin/busybox cpio -o -H newc 2>/dev/null) > l2-initrd.cpio

# ---- L1: kvm modules, mdvm and its libraries, the L2 kernel and initrd
rm -rf l1root && add_busybox l1root
for m in virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd; do
	cp "$moddir/$m.ko" l1root/mods/
done
cp "$mdvm" l1root/bin/mdvm
strip l1root/bin/mdvm
for lib in $(ldd "$mdvm" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
	mkdir -p "l1root$(dirname "$lib")"
	cp -L "$lib" "l1root$lib"
done
mkdir -p l1root/l2
cp -L "$vmlinuz" l1root/l2/vmlinuz
cp vmlinux l1root/l2/vmlinux
cp l2-initrd.cpio l1root/l2/initrd
cp "$here"/l1-init l1root/init
chmod +x l1root/init
(cd l1root && find . | ./bin/busybox cpio -o -H newc 2>/dev/null) > l1-initrd.cpio
echo "$stamp" > stamp
echo "$cache"
