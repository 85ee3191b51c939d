"""The guest image of the end-to-end tests and the bench's guest level: a Debian cloud kernel and a busybox initramfs.

Built from Debian packages only, never installed on the host:

* the kernel: ``linux-image-cloud-amd64`` names the ABI package
  (``linux-image-<abi>-cloud-amd64``), which ``apt-get download`` fetches and
  ``dpkg-deb -x`` unpacks; ``/boot/vmlinuz-*`` is the kernel, and the virtio-net and
  virtio-rng modules (:data:`MODULES`) come from its ``/lib/modules`` tree;
* busybox: ``busybox-static``, downloaded and unpacked the same way;
* iperf3 and ethtool: the host's binaries (Debian packages ``iperf3`` and ``ethtool``)
  with the shared libraries ``ldd`` names and the dynamic loader.

The initramfs (cpio ``newc`` + gzip) holds busybox and its applet links, the modules and
their load order (dependency order read from each module's ``depends=``), iperf3,
ethtool, a small guest agent and :data:`INIT_SCRIPT` as ``/init``, which:

1. mounts proc, sys, devtmpfs and a tmpfs on /tmp, loads the modules (a virtio-rng
   device, QEMU's own or vhost-user's, then feeds ``/dev/hwrng``);
2. configures ``eth0`` from the kernel command line: ``vq.ip=ADDR/PREFIX``,
   ``vq.mtu=M`` (optional), ``vq.queues=N`` (``ethtool -L eth0 combined N`` when ethtool
   is present, else skipped);
3. prints ``VQ-READY`` on the console and runs the command given base64-encoded as
   ``vq.cmd=...`` (default :data:`AGENT_COMMAND`), then prints ``VQ-END rc=<n>`` and
   powers off (``poweroff -f``).

``vq-serve`` (the default command) runs the guest agent: busybox ``nc -ll -p 7000 -e
vq-agent``; each TCP connection carries one command line, then the command's stdin (the
rest of the stream) and its stdout+stderr followed by ``VQ-RC <n>``.

The image is built once and cached under ``<root>/<key>`` (:func:`default_cache_root`:
``$VQ_E2E_CACHE``, else ``.cache/e2e`` of a source checkout, ignored by git, else
``$XDG_CACHE_HOME/pyvirtio/guest``, by default ``~/.cache/pyvirtio/guest``, for an
installed package), where the key hashes the package versions, the host binaries copied
in and the scripts.

Use it as a module (:func:`build_image`) or a command::

    python -m pyvirtio.guest.image [--force] [--cache DIR] [-v]
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "GuestImageError", "GuestImageUnavailable", "GuestImage", "MODULES", "INIT_SCRIPT",
    "AGENT_SCRIPT", "AGENT_PORT", "AGENT_COMMAND", "KERNEL_META_PACKAGE",
    "BUSYBOX_PACKAGE", "HOST_BINARIES", "default_cache_root", "build_image",
    "module_load_order", "module_depends", "encode_command", "kernel_cmdline",
    "newest_cached",
]

log = logging.getLogger("pyvirtio.guest.image")

#: Debian's meta package that depends on the current cloud kernel ABI package
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: Debian's statically linked busybox
BUSYBOX_PACKAGE = "busybox-static"
#: the virtio-net and virtio-rng drivers and what they need (all modules in the cloud
#: kernel; virtio_rng's rng_core, the hw_random core behind /dev/hwrng, is built in:
#: CONFIG_HW_RANDOM=y)
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_rng")
#: host binaries copied into the guest with their shared libraries
HOST_BINARIES = {"iperf3": "/usr/bin/iperf3", "ethtool": "/usr/sbin/ethtool"}
#: TCP port of the guest agent
AGENT_PORT = 7000
#: the command the guest runs when none is given: serve the agent until powered off
AGENT_COMMAND = "vq-serve"
#: bump to rebuild every cached image after a change of the build itself
BUILD_FORMAT = 1

#: ``/init`` of the initramfs (busybox ash)
INIT_SCRIPT = r"""#!/bin/sh
# vqcore e2e guest init: mount, load virtio-net, configure eth0, run vq.cmd, power off
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /root
mount -t tmpfs -o size=256m tmpfs /tmp
echo 4 > /proc/sys/kernel/printk

arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0;; esac
    done
    return 1
}

for m in $(cat /etc/vq-modules); do
    insmod "/lib/modules/$m.ko" || echo "VQ-ERROR insmod $m"
done

IP=$(arg vq.ip)
MTU=$(arg vq.mtu)
QUEUES=$(arg vq.queues)
CMD=$(arg vq.cmd)

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ ! -e /sys/class/net/eth0 ]; then
    echo "VQ-ERROR no eth0"
else
    [ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
    if [ -n "$QUEUES" ] && [ "$QUEUES" -gt 1 ]; then
        if command -v ethtool >/dev/null; then
            ethtool -L eth0 combined "$QUEUES" || echo "VQ-ERROR ethtool -L $QUEUES"
        else
            echo "VQ-INFO no ethtool: queues left as the driver set them"
        fi
    fi
    [ -n "$IP" ] && ip addr add "$IP" dev eth0
    ip link set eth0 up
fi
echo "VQ-READY features=$(cat /sys/class/net/eth0/device/features 2>/dev/null)"
if [ -n "$CMD" ]; then
    echo "$CMD" | base64 -d > /tmp/vq-cmd.sh
else
    echo "vq-serve" > /tmp/vq-cmd.sh
fi
sh /tmp/vq-cmd.sh
echo "VQ-END rc=$?"
sync
poweroff -f
"""

#: ``/bin/vq-agent``: one command per connection (busybox ``nc -e`` runs it)
AGENT_SCRIPT = r"""#!/bin/sh
# one command line, then its stdin is the rest of the stream; output, then VQ-RC <n>
read -r line
sh -c "$line" 2>&1
echo "VQ-RC $?"
"""

#: ``/bin/vq-serve``: the agent server (forks one vq-agent per connection)
SERVE_SCRIPT = r"""#!/bin/sh
exec nc -ll -p %d -e /bin/vq-agent
""" % AGENT_PORT


class GuestImageError(RuntimeError):
    """Building the guest image failed."""


class GuestImageUnavailable(GuestImageError):
    """A package or tool the guest image needs cannot be had on this machine."""


@dataclass(frozen=True)
class GuestImage:
    """A built image: kernel, initramfs and what went into them."""

    kernel: Path
    initrd: Path
    key: str
    versions: Mapping[str, str] = field(default_factory=dict)
    modules: Sequence[str] = ()

    @property
    def kernel_release(self) -> str:
        """The kernel's release string (``6.1.0-NN-cloud-amd64``)."""
        return self.versions.get("kernel_release", "")


# ---------------------------------------------------------------------------------------
# helpers

def encode_command(command: str) -> str:
    """The ``vq.cmd=`` value for a shell command (base64 without newlines)."""
    return base64.b64encode(command.encode()).decode()


def kernel_cmdline(*, ip: str | None = None, mtu: int | None = None,
                   queues: int | None = None, command: str | None = None,
                   extra: Iterable[str] = ()) -> str:
    """The kernel command line the image's ``/init`` understands."""
    words = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4"]
    if ip:
        words.append(f"vq.ip={ip}")
    if mtu:
        words.append(f"vq.mtu={mtu}")
    if queues:
        words.append(f"vq.queues={queues}")
    if command is not None:
        words.append(f"vq.cmd={encode_command(command)}")
    words.extend(extra)
    line = " ".join(words)
    if len(line) >= 2048:   # x86 COMMAND_LINE_SIZE
        raise ValueError(f"kernel command line too long ({len(line)} bytes): pass a "
                         "shorter command or use the guest agent")
    return line


def default_cache_root() -> Path:
    """``$VQ_E2E_CACHE``; in a source checkout (an editable install)
    ``<repository>/.cache/e2e``; else ``$XDG_CACHE_HOME/pyvirtio/guest`` (default
    ``~/.cache/pyvirtio/guest``)."""
    env = os.environ.get("VQ_E2E_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]         # src/pyvirtio/guest/image.py
    if (repo / "pyproject.toml").is_file() and (repo / "src" / "pyvirtio").is_dir():
        return repo / ".cache" / "e2e"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pyvirtio" / "guest"


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str,
         unavailable: bool = False) -> str:
    """Run ``argv``, return its stdout; raise with its stderr on failure."""
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                              check=False, timeout=600)
    except FileNotFoundError as exc:
        raise GuestImageUnavailable(f"{what}: {argv[0]} is not installed") from exc
    if proc.returncode != 0:
        cls = GuestImageUnavailable if unavailable else GuestImageError
        raise cls(f"{what} failed (exit {proc.returncode}): "
                  f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def candidate_version(package: str) -> str:
    """The version ``apt-get download`` would fetch (apt's candidate)."""
    out = _run(["apt-cache", "policy", package], what=f"apt-cache policy {package}",
               unavailable=True)
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    if not m or m.group(1) == "(none)":
        raise GuestImageUnavailable(
            f"apt knows no candidate of {package} (run apt-get update first?)")
    return m.group(1)


def resolve_kernel_package() -> str:
    """``linux-image-<abi>-cloud-amd64``: what :data:`KERNEL_META_PACKAGE` depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE],
               what=f"apt-cache depends {KERNEL_META_PACKAGE}", unavailable=True)
    names = re.findall(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", out)
    names = [n for n in names if n != KERNEL_META_PACKAGE and not n.startswith("<")]
    if not names:
        raise GuestImageUnavailable(
            f"{KERNEL_META_PACKAGE} names no kernel package (run apt-get update first?)")
    return names[0]


def download(packages: Mapping[str, str], dest: Path) -> dict[str, Path]:
    """``apt-get download name=version`` for each package into ``dest``; name -> .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)   # apt's _apt user writes there when it can
    specs = [f"{name}={version}" for name, version in packages.items()]
    log.info("downloading %s", " ".join(specs))
    _run(["apt-get", "download", "-q", *specs], cwd=dest,
         what="apt-get download " + " ".join(specs), unavailable=True)
    debs: dict[str, Path] = {}
    for name in packages:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            raise GuestImageError(f"apt-get download left no {name}_*.deb in {dest}")
        debs[name] = found[-1]
    return debs


def unpack(deb: Path, dest: Path) -> None:
    """``dpkg-deb -x deb dest``."""
    _run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"dpkg-deb -x {deb.name}",
         unavailable=False)


def module_bytes(path: Path) -> bytes:
    """A module's ELF image, decompressed from ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True,
                              check=False)
        if proc.returncode != 0:
            raise GuestImageUnavailable(f"cannot decompress {name}: zstd failed or "
                                        "missing")
        return proc.stdout
    return data


_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def module_depends(image: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` (names with ``_``)."""
    m = _DEPENDS.search(image)
    if m is None:
        raise GuestImageError("module has no depends= entry in .modinfo")
    text = m.group(1).decode()
    return [d.replace("-", "_") for d in text.split(",") if d]


def module_load_order(depends: Mapping[str, Sequence[str]]) -> list[str]:
    """A load order in which each module follows everything it depends on (stable: ties
    keep the order of ``depends``). A dependency missing from ``depends`` or a cycle
    raises :class:`GuestImageError`."""
    order: list[str] = []
    state: dict[str, int] = {}   # 1 visiting, 2 done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise GuestImageError("module dependency cycle: " + " -> ".join(chain + (name,)))
        if name not in depends:
            raise GuestImageError(f"module {chain[-1]} depends on {name}, which is not in "
                                  "the image")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, chain + (name,))
        state[name] = 2
        order.append(name)

    for name in depends:
        visit(name, ())
    return order


def find_modules(tree: Path, names: Iterable[str]) -> dict[str, Path]:
    """name -> module file under ``tree`` (``lib/modules/<release>/kernel``)."""
    wanted = {n.replace("-", "_") for n in names}
    found: dict[str, Path] = {}
    for path in sorted(tree.rglob("*.ko*")):
        base = path.name.split(".ko")[0].replace("-", "_")
        if base in wanted and base not in found:
            found[base] = path
    missing = wanted - set(found)
    if missing:
        raise GuestImageError(f"modules not in the kernel package: {sorted(missing)}")
    return found


def shared_libraries(binary: str) -> list[str]:
    """Absolute paths of the libraries ``ldd`` lists for ``binary``, loader included."""
    out = _run(["ldd", binary], what=f"ldd {binary}", unavailable=True)
    libs: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+\s+=>\s+(/\S+)", line) or re.match(r"(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            raise GuestImageUnavailable(f"{binary}: shared library {line}")
    return libs


def host_files() -> dict[str, str]:
    """initramfs path -> host path of every host file copied in (binaries and libs)."""
    files: dict[str, str] = {}
    for name, path in HOST_BINARIES.items():
        real = shutil.which(name) or path
        if not os.path.exists(real):
            if name == "ethtool":   # optional: multiqueue is then left as the driver sets it
                log.warning("ethtool not installed: the guest will not run ethtool -L")
                continue
            raise GuestImageUnavailable(f"{name} is not installed ({path})")
        files[path] = real
        for lib in shared_libraries(real):
            files[lib] = lib
    return files


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# build

def _key(versions: Mapping[str, str], files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": BUILD_FORMAT, "versions": dict(versions),
                         "modules": list(MODULES), "init": INIT_SCRIPT,
                         "agent": AGENT_SCRIPT, "serve": SERVE_SCRIPT}, sort_keys=True
                        ).encode())
    for dest in sorted(files):
        h.update(dest.encode() + b"\0" + _sha256_file(files[dest]).encode())
    return h.hexdigest()[:16]


def _load_manifest(folder: Path) -> GuestImage | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    kernel, initrd = folder / "vmlinuz", folder / "initrd.gz"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return GuestImage(kernel, initrd, data["key"], data["versions"], data["modules"])


def newest_cached(root: Path) -> GuestImage | None:
    """The most recently built image under ``root``, if any."""
    images = [img for img in (_load_manifest(d) for d in root.glob("*") if d.is_dir())
              if img is not None]
    return max(images, key=lambda img: img.initrd.stat().st_mtime, default=None)


def build_image(cache_root: Path | None = None, *, force: bool = False) -> GuestImage:
    """The guest image, from the cache when its key matches, else built now.

    When apt cannot name the package versions (no ``apt-get update`` yet) the newest
    cached image is used, if there is one. Raises :class:`GuestImageUnavailable` when
    apt, the packages or the host binaries cannot be had (a reason to skip),
    :class:`GuestImageError` when the build fails.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    try:
        kernel_pkg = resolve_kernel_package()
        versions = {kernel_pkg: candidate_version(kernel_pkg),
                    BUSYBOX_PACKAGE: candidate_version(BUSYBOX_PACKAGE)}
    except GuestImageUnavailable as exc:
        cached = newest_cached(root)
        if cached is None or force:
            raise
        log.warning("%s; using the cached guest image %s", exc, cached.key)
        return cached
    files = host_files()
    key = _key(versions, files)
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # one build at a time per cache
        if not force:
            image = _load_manifest(folder)
            if image is not None:
                log.debug("guest image %s from the cache", key)
                return image
        with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
            staged = Path(tmp) / "out"
            image = _build(Path(tmp), staged, key, kernel_pkg, versions, files)
            if folder.exists():
                shutil.rmtree(folder)
            staged.rename(folder)
        return GuestImage(folder / "vmlinuz", folder / "initrd.gz", key,
                          image.versions, image.modules)


def _build(work: Path, out: Path, key: str, kernel_pkg: str, versions: Mapping[str, str],
           files: Mapping[str, str]) -> GuestImage:
    debs = download(versions, work / "debs")
    kroot, broot = work / "kernel", work / "busybox"
    unpack(debs[kernel_pkg], kroot)
    unpack(debs[BUSYBOX_PACKAGE], broot)

    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestImageError(f"{kernel_pkg} holds no /boot/vmlinuz-*")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    moddir = kroot / "lib" / "modules" / release
    if not moddir.is_dir():
        moddir = kroot / "usr" / "lib" / "modules" / release
    found = find_modules(moddir, MODULES)
    images = {name: module_bytes(path) for name, path in found.items()}
    depends = {name: module_depends(images[name]) for name in MODULES}
    order = module_load_order(depends)

    busybox = next((p for p in (broot / "bin" / "busybox", broot / "usr" / "bin" / "busybox")
                    if p.is_file()), None)
    if busybox is None:
        raise GuestImageError(f"{BUSYBOX_PACKAGE} holds no busybox binary")

    initramfs = work / "initramfs"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
              "run", "root", "lib/modules", "lib64", "lib/x86_64-linux-gnu"):
        (initramfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, initramfs / "bin" / "busybox")
    os.chmod(initramfs / "bin" / "busybox", 0o755)
    applets = _run([str(initramfs / "bin" / "busybox"), "--list-full"],
                   what="busybox --list-full").split()
    for applet in applets:
        link = initramfs / applet
        if applet == "bin/busybox" or os.path.lexists(link):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for name in order:
        (initramfs / "lib" / "modules" / f"{name}.ko").write_bytes(images[name])
    (initramfs / "etc" / "vq-modules").write_text("\n".join(order) + "\n")
    for dest, src in files.items():
        target = initramfs / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(src, target)
        os.chmod(target, 0o755)
    for path, text in (("init", INIT_SCRIPT), ("bin/vq-agent", AGENT_SCRIPT),
                       ("bin/vq-serve", SERVE_SCRIPT)):
        (initramfs / path).write_text(text)
        os.chmod(initramfs / path, 0o755)
    (initramfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (initramfs / "etc" / "group").write_text("root:x:0:\n")
    (initramfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")

    out.mkdir(parents=True)
    _cpio_gzip(initramfs, out / "initrd.gz")
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    all_versions = dict(versions)
    all_versions["kernel_release"] = release
    for name in ("iperf3", "ethtool"):
        try:
            all_versions[name] = _run(["dpkg-query", "-W", "-f=${Version}", name],
                                      what=f"dpkg-query {name}").strip()
        except GuestImageError:
            pass
    manifest = {"key": key, "versions": all_versions, "modules": order,
                "files": sorted(files)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("guest image %s: kernel %s (%.1f MiB), initramfs %.1f MiB, modules %s",
             key, release, (out / "vmlinuz").stat().st_size / 2**20,
             (out / "initrd.gz").stat().st_size / 2**20, " ".join(order))
    return GuestImage(out / "vmlinuz", out / "initrd.gz", key, all_versions, order)


def _cpio_gzip(tree: Path, out: Path) -> None:
    """``find . | cpio -o -H newc | gzip`` of ``tree`` (owner root) into ``out``."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = "\n".join(names) + "\n"
    try:
        proc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
                              cwd=tree, input=listing.encode(), capture_output=True,
                              check=False, timeout=300)
    except FileNotFoundError as exc:
        raise GuestImageUnavailable("cpio is not installed") from exc
    if proc.returncode != 0:
        raise GuestImageError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    """``python -m pyvirtio.guest.image``: build (or find) the image, print its paths."""
    p = argparse.ArgumentParser(description="Build the e2e guest image (cached).")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: $VQ_E2E_CACHE, else .cache/e2e of a source "
                        "checkout, else $XDG_CACHE_HOME/pyvirtio/guest, by default "
                        "~/.cache/pyvirtio/guest)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        image = build_image(args.cache, force=args.force)
    except GuestImageError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd),
                                 "key": image.key, "versions": dict(image.versions),
                                 "modules": list(image.modules)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
