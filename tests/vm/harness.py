"""A live nftables harness: boots Debian's stock kernel (it has nft `queue`, `ct`, `tproxy`; the
host kernel lacks nft `queue`) in qemu and runs tests/vm/guest.py there, as root, on the host's
own files.

How (../shared/kernel-facts.md, "A kernel with nft `queue` and `tproxy`, here"):
- The kernel: `apt-get download` the linux-image-*-amd64 package that linux-image-amd64 depends
  on (resolved at run time), unpacked with `dpkg-deb -x` into a cache directory and `depmod -b`.
  It is the only download, from Debian's registry; later runs reuse it.
- The initramfs: busybox-static, the virtio/9p/overlay modules with their dependencies, and an
  init that mounts the host's / READ-ONLY over 9p under a tmpfs overlay, a second (read-write)
  9p share for the job and its results, points module autoload at the unpacked kernel's modules,
  runs the job's script, and powers off. The host's / is never shared read-write (qemu's
  `readonly=on` and a read-only mount both).
- qemu: TCG (no KVM here), `-no-reboot -nic none`, `panic=-1`, under `timeout`, killed by PID.
  Environment variables do not reach the guest: everything goes through the job directory.

The job directory (the guest's /vmout) holds job.json (time scale, checks, sabotage), the
rulesets rendered here with the project's own API (fw4 include, queue chains), the config, and
afterwards results.json, guest.log and console.log.

The relay checks run the real `hushgate run` (backend nftables, tcp_hold relay) against the
project's TLS cloud (hushsim/cloud.py) and speaker simulator (hushsim/speaker.py): the test
CA and the hosts' certificates are made here (cryptography is slow to import in the guest) and
handed over in the job directory with the cloud's config.

One boot runs everything: the checks, then (with `sabotage_pass`) the fail-closed checks again
with the rendered rules sabotaged, which must then fail (results.json "sabotaged").

Command line: `python -m tests.vm.harness [--sabotage NAME]... [--sabotage-pass NAME]...
[--check NAME]... [--out DIR]`. `--sabotage` sabotages the whole run (the checks asked for are
expected to fail); `--sabotage-pass` adds the second, sabotaged pass after the normal one.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python tests/vm/harness.py` as well as `-m tests.vm.harness`
    sys.path.insert(0, str(REPO))

from tests.vm import guest  # noqa: E402  (the check names; nothing runs on import)

CACHE = Path("/var/cache/hushgate-vm")
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# What the host needs, as (command, Debian package); scripts/bootstrap.sh installs them.
TOOLS = (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
         ("depmod", "kmod"), ("modprobe", "kmod"), ("dpkg-deb", "dpkg"), ("apt-get", "apt"),
         ("nft", "nftables"), ("ip", "iproute2"), ("timeout", "coreutils"))
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
TIME_SCALE = 15.0  # CPU-bound work in the TCG guest is ~15x slower than here
DEFAULT_TIMEOUT_S = 480.0  # the whole boot; a normal one takes ~2-3 min

# Sabotage: take one fail-closed element out of the rendered rules, to show the checks catch it.
# Each is a line rewrite; one that matches no line is an error (the rendering changed).
SABOTAGE = {
    "no-safety-net": "the safety net only counts (its drop removed): with no guard, a guarded "
                     "device's UDP passes",
    "queue-bypass": "the queue statements get `bypass`: with no consumer, UDP passes",
    "no-tproxy-drop": "the explicit drop after nft `tproxy` removed: with no relay listening, "
                      "TCP falls through tproxy (the FORWARD reset still stops it)",
    "no-forward-reset": "FORWARD accepts a relayed device's TCP that was not intercepted "
                        "(instead of resetting it)",
}


def _sabotage_line(name: str, line: str) -> str:
    if name == "no-safety-net" and "hushgate safety net: fail-closed" in line:
        return line.replace("counter drop comment", "counter comment").replace(
            "fail-closed", "SABOTAGED, no drop")
    if name == "queue-bypass":
        return re.sub(r"(queue num \d+(?:-\d+)?)( fanout)?\s*$",
                      lambda m: m.group(1) + (" fanout,bypass" if m.group(2) else " bypass"), line)
    if name == "no-tproxy-drop" and "hushgate relay: no listener" in line:
        return line.replace("counter drop comment", "counter comment").replace(
            "fail-closed", "SABOTAGED, no drop")
    if name == "no-forward-reset" and re.search(r"@relay_\w+ ct mark .* != .* reject", line):
        return line.replace("reject with tcp reset", "accept")
    return line


def sabotage_files(files: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    out = dict(files)
    for name in names:
        if name not in SABOTAGE:
            raise HarnessError(f"unknown sabotage {name!r}; known: {sorted(SABOTAGE)}")
        changed = 0
        for fname, text in out.items():
            lines = text.split("\n")
            new = [_sabotage_line(name, ln) for ln in lines]
            changed += sum(a != b for a, b in zip(lines, new))
            out[fname] = "\n".join(new)
        if not changed:
            raise HarnessError(f"sabotage {name} matched no rule: the rendered rules changed")
    return out


class HarnessError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """`command (apt-get install package)` for each tool the harness needs and cannot find."""
    out = []
    for cmd, pkg in TOOLS:
        if cmd == "busybox":
            found = any(os.access(p, os.X_OK) for p in BUSYBOX_CANDIDATES)
        else:
            found = shutil.which(cmd) is not None
        if not found:
            out.append(f"{cmd} (apt-get install {pkg})")
    return out


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-800:]}")
    return res


# ------------------------------------------------------------------------------------ kernel


@dataclass(frozen=True)
class Kernel:
    version: str  # uname -r in the guest, e.g. 6.1.0-57-amd64
    root: Path  # the unpacked package
    package: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.version}"


def kernel_package() -> str:
    """The linux-image-<version>-amd64 package the linux-image-amd64 metapackage depends on
    today (apt's lists are refreshed once when they know nothing of it)."""
    for attempt in (0, 1):
        res = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True, timeout=120)
        for line in res.stdout.splitlines():
            m = re.match(r"\s*Depends:\s*(linux-image-\S+)$", line)
            if m:
                return m.group(1)
        if attempt == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise HarnessError("apt-cache depends linux-image-amd64 names no linux-image package")


def ensure_kernel(cache: Path = CACHE, log=print) -> Kernel:
    """The stock Debian kernel, unpacked and depmod'ed under `cache` (downloaded once)."""
    package = kernel_package()
    version = package.removeprefix("linux-image-").removesuffix("-unsigned")
    root = cache / version
    kernel = Kernel(version, root, package)
    if (root / ".ready").exists() and kernel.vmlinuz.exists():
        return kernel
    log(f"vm: fetching {package} from Debian into {root}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # apt-get download drops to _apt when it can
        _run(["apt-get", "download", "-q", package], cwd=tmp, timeout=600)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise HarnessError(f"apt-get download {package} left {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    if not kernel.vmlinuz.exists():
        raise HarnessError(f"{package} has no {kernel.vmlinuz.relative_to(root)}")
    _run(["depmod", "-b", str(root), version])
    (root / ".ready").write_text(package + "\n")
    return kernel


def module_closure(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for `names` and everything they depend on, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for n in names:
        path = by_name.get(n.replace("-", "_"))
        if path is None:
            builtin = (kernel.modules / "modules.builtin").read_text()
            if f"/{n}.ko" in builtin:
                continue
            raise HarnessError(f"module {n} is not in {kernel.package}")
        visit(path)
    return [kernel.modules / p for p in order]


# ------------------------------------------------------------------------------------ initramfs

INIT = r"""#!/bin/busybox sh
# hushgate VM init (PID 1). The host's / is mounted READ-ONLY, under a tmpfs overlay.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "hushgate-vm: $*"; }
off() { sync; say "power off"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
for m in $(cat /modules.order); do insmod "/mod/$m" || say "insmod $m failed"; done
for a in $(cat /proc/cmdline); do
  case "$a" in
    hushgate.modules=*) MODDIR="${a#hushgate.modules=}" ;;
    hushgate.repo=*) REPO="${a#hushgate.repo=}" ;;
  esac
done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower \
  || { say "cannot mount the host root"; off; }
mount -t tmpfs -o size=384m tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot \
  || { say "cannot mount the overlay"; off; }
mkdir -p /newroot/vmout
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 vmout /newroot/vmout \
  || { say "cannot mount the job share"; off; }
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/tmp
# A checkout under /tmp or /run (a CI clone) would be hidden by those tmpfs: show it (read-only)
case "$REPO" in
  /tmp/*|/run/*) mkdir -p "/newroot$REPO" && mount --bind "/lower$REPO" "/newroot$REPO" \
    || say "cannot show the checkout $REPO" ;;
esac
KVER=$(uname -r)
mkdir -p "/newroot/lib/modules/$KVER"
mount --bind "/newroot$MODDIR" "/newroot/lib/modules/$KVER" || say "no modules at $MODDIR"
echo /sbin/modprobe-guest > /proc/sys/kernel/modprobe
echo 1 > /proc/sys/kernel/sysrq
hostname hushgate-vm
ip link set lo up 2>/dev/null
say "running the job"
chroot /newroot /bin/sh /vmout/run.sh > /newroot/vmout/guest.log 2>&1
say "job exit $?"
umount /newroot/vmout
off
"""

# Module autoload (request_module) runs this from the initramfs' root: modprobe from the host's
# tree, which sees the guest kernel's modules through the bind mount above.
MODPROBE = """#!/bin/busybox sh
exec /bin/chroot /newroot /sbin/modprobe "$@"
"""


def _cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor))."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        out.write(b"070701" + b"".join(b"%08x" % f for f in fields) + nb)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    for i, (name, mode, data, rdev) in enumerate(entries, start=1):
        put(name, mode, data, rdev, i)
    put("TRAILER!!!", 0, b"", (0, 0), 0)
    return out.getvalue()


def build_initramfs(kernel: Kernel, cache: Path = CACHE) -> Path:
    """The initramfs (cached by its content): busybox, modules, init."""
    busybox = next((Path(p) for p in BUSYBOX_CANDIDATES if os.access(p, os.X_OK)), None)
    if busybox is None:
        raise HarnessError("busybox not found (apt-get install busybox-static)")
    bb = busybox.read_bytes()
    if b"ld-linux" in bb[:4096] or b"/lib64/ld-" in bb[:8192]:
        raise HarnessError(f"{busybox} is dynamically linked (apt-get install busybox-static)")
    mods = module_closure(kernel, INITRD_MODULES)
    D, F, X = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, D, b"", (0, 0)) for d in ("bin", "sbin", "dev", "proc", "sys", "mod", "tmp")
    ]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", X, bb, (0, 0)))
    entries.append(("init", X, INIT.encode(), (0, 0)))
    entries.append(("sbin/modprobe-guest", X, MODPROBE.encode(), (0, 0)))
    entries.append(("modules.order", F, "\n".join(m.name for m in mods).encode() + b"\n",
                    (0, 0)))
    entries += [(f"mod/{m.name}", F, m.read_bytes(), (0, 0)) for m in mods]
    raw = _cpio(entries)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    path = cache / kernel.version / f"initrd-{digest}.gz"
    if not path.exists():
        for old in path.parent.glob("initrd-*.gz"):
            old.unlink()
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------ the job

CONFIG = """\
# The guard's config for the VM topology (tests/vm/guest.py): one guarded (strict) speaker whose
# TCP the relay holds, QUIC blocked; fw4's backend. hold_timeout_s is the guest's time scale
# times the default's margin: a pending upload must outlive the guest's slow CLI round trips.
[guard]
backend = "nftables"
tcp_hold = "relay"
hold_timeout_s = {hold_timeout_s}
queue = {queue}
fail = "closed"
quic = "block"
socket = "/run/hushgate/control.sock"
state_db = "/run/hushgate/state.db"

[metrics]
listen = ""

[[device]]
name = "speaker"
mac = "{mac}"
address = "{address}"
mode = "strict"
"""


def write_cloud(out: Path) -> dict:
    """The TLS cloud's certificates (a fresh test CA) and config, for hushsim/cloud.py in the
    guest's wan namespace: one address per vendor host, TCP :443 only."""
    try:
        from hushsim.certs import TestCA
    except ImportError as exc:
        raise HarnessError(f"the TLS cloud's certificates need {exc.name} "
                           "(pip install -e '.[dev]')") from None

    hosts = guest.TLS_HOSTS
    TestCA("hushgate VM test CA").write(out / "certs", list(hosts))
    certs = f"{guest.OUT}/certs"  # where the guest sees them
    config = {
        "hosts": [{"name": name, "addrs": [addr], "cert": f"{certs}/{name}.pem",
                   "key": f"{certs}/{name}.key"} for name, addr in hosts.items()],
        "control": guest.CLOUD_SOCKET,
        "udp": False,
        "max_seconds": 900,
    }
    (out / "cloud.json").write_text(json.dumps(config, indent=1))
    return {"ca": f"{certs}/ca.pem", "config": f"{guest.OUT}/cloud.json"}


def render_files(config, sabotage: tuple[str, ...] = ()) -> dict[str, str]:
    """The rulesets the guest loads, rendered by the project's code (sabotaged when asked)."""
    from guard.shell.firewall import NftablesBackend
    from guard.shell.fwspec import spec_from_config
    from guard.tools.uci import fw4_include

    backend = NftablesBackend(spec_from_config(config))
    files = {
        # what /etc/init.d/hushgate writes to /var/etc/hushgate/fw4.nft for fw4 to include
        "hushgate-fw4.nft": fw4_include(config),
        # what `hushgate run` loads on start and on exit (NftRunBackend)
        "dynamic-install.nft": backend.dynamic_script(install=True),
        "dynamic-remove.nft": backend.dynamic_script(install=False),
    }
    return sabotage_files(files, sabotage)


def write_job(out: Path, *, checks: tuple[str, ...] = (), sabotage: tuple[str, ...] = (),
              sabotage_pass: tuple[str, ...] = (), time_scale: float = TIME_SCALE) -> dict:
    """The job directory: config, rulesets rendered by the project's code, the TLS cloud's
    certificates and config, job.json, run.sh. `sabotage_pass` adds a sabotaged copy of the
    rulesets in sabotaged/ for the guest's second pass."""
    from guard.core.config import load_config
    from guard.shell.firewall import NftablesBackend
    from guard.shell.fwspec import spec_from_config

    topo = guest.TOPOLOGY
    cfg = out / "config.toml"
    cfg.write_text(CONFIG.format(queue=topo["queue"], mac=topo["speaker_mac"],
                                 address=topo["speaker"],
                                 hold_timeout_s=round(20.0 * max(1.0, time_scale / 5), 1)))
    config = load_config(str(cfg))
    backend = NftablesBackend(spec_from_config(config))
    files = render_files(config, sabotage)
    # `hushgate firewall show --backend nftables`, for the record
    files["ruleset-show.nft"] = backend.render()
    for name, text in files.items():
        (out / name).write_text(text)
    if sabotage_pass:
        (out / "sabotaged").mkdir(exist_ok=True)
        for name, text in render_files(config, sabotage_pass).items():
            (out / "sabotaged" / name).write_text(text)
    cloud = write_cloud(out)
    marks = backend.spec.marks
    job = {
        "repo": str(REPO),
        "python": str(REPO / ".venv" / "bin" / "python"),
        "hushgate": str(REPO / ".venv" / "bin" / "hushgate"),
        "fw4_include_file": str(REPO / "packaging/openwrt/hushgate/files/hushgate.fw4.nft"),
        "time_scale": time_scale,
        "checks": list(checks),
        "sabotage": list(sabotage),
        "sabotage_pass": list(sabotage_pass),
        "sabotage_pass_checks": list(guest.SABOTAGE_PASS_CHECKS) if sabotage_pass else [],
        "cloud": cloud,
        "marks": {"mask": marks.verdict_mask, "allow": marks.allow, "block": marks.block,
                  "device": marks.device},
        "queue": topo["queue"],
        "relayed": backend.spec.relay,
        "relay_port": backend.spec.relay_port,
        "relay_table": backend.spec.relay_table,
        "hold_timeout_s": config.hold_timeout_s,
    }
    (out / "job.json").write_text(json.dumps(job, indent=1))
    (out / "run.sh").write_text(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1\n"
        f"cd {REPO}\n"
        f"exec {job['python']} -X faulthandler {REPO}/tests/vm/guest.py /vmout/job.json\n"
    )
    return job


@dataclass
class VmRun:
    results: dict
    wall_s: float
    boot_s: float | None
    out: Path
    returncode: int

    @property
    def console(self) -> str:
        p = self.out / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @property
    def guest_log(self) -> str:
        p = self.out / "guest.log"
        return p.read_text(errors="replace") if p.exists() else ""


def qemu_argv(kernel: Kernel, initrd: Path, out: Path, memory_mb: int = 1024,
              cpus: int = 2) -> list[str]:
    append = (f"console=ttyS0 panic=-1 quiet loglevel=4 hushgate.modules={kernel.modules} "
              f"hushgate.repo={REPO}")
    return [
        "qemu-system-x86_64", "-nodefaults", "-machine", "pc", "-accel", "tcg",
        "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", append,
        "-display", "none", "-serial", f"file:{out / 'console.log'}",
        "-no-reboot", "-nic", "none",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=vmout,security_model=none,multidevs=remap",
    ]


def run_vm(*, checks: tuple[str, ...] = (), sabotage: tuple[str, ...] = (),
           sabotage_pass: tuple[str, ...] = (), timeout_s: float = DEFAULT_TIMEOUT_S, out: Path | None = None,
           cache: Path = CACHE, log=print) -> VmRun:
    """Boot the VM once, run the guest checks, return their results."""
    t0 = time.monotonic()
    missing = missing_tools()
    if missing:
        raise HarnessError("missing: " + ", ".join(missing))
    cache.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel(cache, log)
    initrd = build_initramfs(kernel, cache)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="hushgate-vm-"))
    out.mkdir(parents=True, exist_ok=True)
    write_job(out, checks=checks, sabotage=sabotage, sabotage_pass=sabotage_pass)
    t_boot = time.monotonic()
    argv = ["timeout", "-k", "5", str(int(timeout_s))] + qemu_argv(kernel, initrd, out)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: timeout and qemu, nothing else
        stdout, _ = proc.communicate(timeout=10)
    if stdout and stdout.strip():
        (out / "qemu.log").write_bytes(stdout)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    boot_s = None
    if results.get("guest_start_unix"):
        boot_s = results["guest_start_unix"] - (time.time() - (time.monotonic() - t_boot))
    if proc.returncode == 124:
        results.setdefault("error", f"the VM did not finish within {timeout_s:.0f} s")
    return VmRun(results, time.monotonic() - t0, boot_s, out, proc.returncode)


def summary(run: VmRun) -> str:
    lines = []
    for c in run.results.get("checks", []):
        mark = "PASS" if c["ok"] else "FAIL"
        lines.append(f"{mark} {c['name']} ({c['seconds']:.1f} s): {c['detail']}")
    if run.results.get("sabotage_pass"):
        lines.append(f"sabotaged pass ({', '.join(run.results['sabotage_pass'])}): each check "
                     "below must FAIL")
        for c in run.results.get("sabotaged", []):
            mark = "FAILED (as it must)" if not c["ok"] else "PASSED (the sabotage went unseen)"
            lines.append(f"  {mark} {c['name']} ({c['seconds']:.1f} s): {c['detail']}")
    if run.results.get("error"):
        lines.append(f"ERROR {run.results['error']}")
    boot = f", boot to the guest runner {run.boot_s:.1f} s" if run.boot_s is not None else ""
    lines.append(f"vm: kernel {run.results.get('kernel', '?')}, nft "
                 f"{run.results.get('nft', '?')}; wall time {run.wall_s:.1f} s{boot}; "
                 f"files in {run.out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="append", default=[], choices=[c.name for c in
                                                                      guest.CHECKS],
                    help="run only these checks (repeatable; default all)")
    ap.add_argument("--sabotage", action="append", default=[], choices=sorted(SABOTAGE),
                    help="; ".join(f"{k}: {v}" for k, v in SABOTAGE.items()))
    ap.add_argument("--sabotage-pass", action="append", default=[], choices=sorted(SABOTAGE),
                    help="after the checks, run the fail-closed ones again with these sabotaged "
                         "(they must fail)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    ap.add_argument("--out", type=Path, help="job directory (default: a new one under /tmp)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("vm: needs root (qemu's 9p export of / and the kernel cache)", file=sys.stderr)
        return 2
    try:
        run = run_vm(checks=tuple(args.check), sabotage=tuple(args.sabotage),
                     sabotage_pass=tuple(args.sabotage_pass), timeout_s=args.timeout,
                     out=args.out)
    except HarnessError as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 2
    print(summary(run))
    checks = run.results.get("checks", [])
    if not checks:
        print(run.console[-3000:] + "\n--- guest.log\n" + run.guest_log[-3000:])
    ok = checks and all(c["ok"] for c in checks) and not run.results.get("error")
    ok = ok and not any(c["ok"] for c in run.results.get("sabotaged", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
