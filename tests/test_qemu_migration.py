"""Live migration of a guest whose devices vhostpy serves (QEMU 7.2, TCG), in one run: two
QEMU processes on this host, each with its own back-ends on the same images
(``vhostpy blk --share-rw``) and its own ``vhostpy net`` (responder on, pcap on).

The guest writes and verifies two disks with O_DIRECT (`rwverify`: vda a plain image,
served by the compiled path under VHOSTPY_IMPLEMENTATION=cffi; vdb an async store that
completes out of order) and pings the responder five times a second, while the host
migrates it (QMP ``migrate unix:...``) mid-run. Migration needs VHOST_F_LOG_ALL and
LOG_SHMFD from every back-end (QEMU refuses otherwise); while it runs the source back-ends
mark every guest page they write in the dirty log, and stop (draining what is in flight)
before QEMU reads their ring bases. Asserted: the migration completes, the guest finishes
at the destination with no I/O error and every block it wrote reading back as written,
the last write on the images, a few pings lost at most while it moved and none after, the
destination's net back-end announced the guest (SEND_RARP: a RARP from its MAC in the
destination's pcap), and the source back-ends logged dirty pages.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from netguest import RESPONDER_IP, configure, ping_stats
from qemu_guest import GuestTimeout, guest_mac, require_qemu, start_guest
from qmp import QMP
from test_qemu_recovery import BLOCKS, build_rwverify, marker

from vhostpy.pcap import read_pcap
from vhostpy.testing.backends import BackendProcess
from vhostpy.testing.console import parse_console
from vhostpy.testing.initramfs import EXIT_MARKER
from vhostpy.testing.qemu import VhostUserDevice

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SECONDS = 18
MIGRATE_AFTER = 6.0        # seconds into the guest's run
PINGS = 75                 # 15 s at 5/s, the migration in the middle
MAX_LOST = 15

GUEST_SCRIPT = configure() + r"""
ping -c 1 -W 5 {responder} > /dev/null
/rwverify /dev/vda {blocks} {seconds} 4 plain > /tmp/vda.out 2>&1 &
a=$!
/rwverify /dev/vdb {blocks} {seconds} 4 async > /tmp/vdb.out 2>&1 &
b=$!
echo "migration-window"
ping -i 0.2 -c {pings} {responder} > /tmp/ping1.out 2>&1
wait $a; echo "vda-rc=$?"
wait $b; echo "vdb-rc=$?"
ping -i 0.2 -c 20 {responder} > /tmp/ping2.out 2>&1
cat /tmp/vda.out /tmp/vdb.out
tail -n 2 /tmp/ping1.out
tail -n 2 /tmp/ping2.out
"""


def _stuck(tmp_path: Path, src_console: str, dst_console: str) -> str:
    """What to look at when the guest did not finish at the destination: both consoles and
    the end of every back-end's log."""
    logs = "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])
                   for log in sorted(tmp_path.glob("*.log")))
    return (f"the guest did not finish at the destination\n--- source console\n"
            f"{src_console[-3000:]}\n--- destination console\n{dst_console[-3000:]}{logs}")


def test_guest_migrates_mid_io_and_mid_ping(tmp_path: Path) -> None:
    require_qemu()
    exe = build_rwverify(tmp_path)
    images = {name: tmp_path / f"{name}.img" for name in ("plain", "async")}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
           "VHOSTPY_TEST_STORE_IMAGE": str(images["async"])}
    procs: list[BackendProcess] = []

    def side(name: str) -> list[VhostUserDevice]:
        socks = [str(tmp_path / f"{name}-{dev}.sock") for dev in ("vda", "vdb", "net")]
        procs.append(BackendProcess("blk", ["-v", "--share-rw", "--image", str(images["plain"])],
                                    [socks[0]], tmp_path / f"{name}-vda.log", env=env))
        procs.append(BackendProcess("blk", ["-v", "--store", "slow_file_store:from_env"],
                                    [socks[1]], tmp_path / f"{name}-vdb.log", env=env))
        procs.append(BackendProcess("net", ["-v", "--pcap", str(tmp_path / f"{name}.pcap")],
                                    [socks[2]], tmp_path / f"{name}-net.log", env=env))
        return [VhostUserDevice(socks[0], "blk"), VhostUserDevice(socks[1], "blk"),
                VhostUserDevice(socks[2], "net")]

    script = GUEST_SCRIPT.format(responder=RESPONDER_IP, blocks=BLOCKS, seconds=SECONDS,
                                 pings=PINGS)
    files = {"rwverify": exe.read_bytes()}
    qmp_src, qmp_dst = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    migration = tmp_path / "migration.sock"
    try:
        with start_guest(script, devices=side("src"), files=files, timeout=300,
                         extra_args=["-qmp", f"unix:{qmp_src},server=on,wait=off"]) as src, \
             start_guest(script, devices=side("dst"), files=files, timeout=300,
                         extra_args=["-qmp", f"unix:{qmp_dst},server=on,wait=off",
                                     "-incoming", f"unix:{migration}"]) as dst:
            src.wait_for_text("migration-window", timeout=120)
            time.sleep(MIGRATE_AFTER)
            monitor = QMP(str(qmp_src))
            info = monitor.migrate(f"unix:{migration}")
            monitor.close()
            print(f"migration: {info.get('total-time')} ms, downtime {info.get('downtime')} ms,"
                  f" {info.get('ram', {}).get('transferred')} bytes of RAM")
            try:
                dst.wait_for_text(EXIT_MARKER, timeout=200)
            except GuestTimeout:
                raise AssertionError(_stuck(tmp_path, src.console_so_far(),
                                            dst.console_so_far())) from None
            code, console = parse_console(src.console_so_far() + dst.console_so_far())
    finally:
        for proc in procs:
            proc.stop()
    print(console)
    assert code == 0, console
    values = dict(re.findall(r"^(v\w+-rc)=(\d+)$", console, re.MULTILINE))
    for name, disk in (("plain", "vda"), ("async", "vdb")):
        summary = re.search(rf"^rwverify {name} writes=(\d+) reads=\d+ errors=(\d+) "
                            r"mismatches=(\d+)", console, re.MULTILINE)
        assert summary, (name, console)
        writes, errors, mismatches = map(int, summary.groups())
        assert (errors, mismatches) == (0, 0), (name, console)
        assert values.get(f"{disk}-rc") == "0", (name, console)
        assert marker(images[name]) == f"LAST-WRITE {name} {writes}".encode(), name
    stats = ping_stats(console)
    assert len(stats) == 2, console
    (sent1, got1), (sent2, got2) = stats
    assert sent1 == PINGS and sent1 - got1 <= MAX_LOST, stats   # lost while it moved
    assert (sent2, got2) == (20, 20), stats                      # none after
    # The source back-ends logged the pages they wrote while QEMU migrated.
    for dev in ("vda", "vdb", "net"):
        log = (tmp_path / f"src-{dev}.log").read_text()
        assert re.search(r"dirty log of \d+ bytes", log), (dev, log[-2000:])
    # The destination's net back-end announced the guest on its behalf (no GUEST_ANNOUNCE).
    mac = bytes.fromhex(guest_mac(0).replace(":", ""))
    rarps = [f for _, f in read_pcap(tmp_path / "dst.pcap")
             if f[12:14] == b"\x80\x35" and f[6:12] == mac]
    assert rarps, "no RARP from the guest's MAC at the destination"
