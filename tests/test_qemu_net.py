"""`vhostpy net` against real QEMU guests: what a Linux virtio-net driver sends and receives.

Five TCG boots (~6-10 s each; two guests at once in one of them):

* ``test_guest_pings_responder_udp_and_pcap`` — a 2-queue-pair guest (``-smp 2``) pings the
  responder (3/3), sends a UDP datagram (busybox ``tftp``) that a Python handler sees with
  exact fields, and every frame of the pcap has valid checksums (the guest's UDP checksum
  was left to the device: NEEDS_CSUM, completed by vhostpy).
* ``test_backend_pings_guest_and_injected_frames_reach_guest`` — scapy-built ICMP echo
  requests injected from Python are answered by the guest kernel and move its rx_packets by
  exactly the injected count; the responder pings the guest; a scapy TCP handshake delivers
  a payload to a busybox ``nc -l`` in the guest.
* ``test_two_guests_ping_each_other_through_one_cli_process`` — the real command
  (``python -m vhostpy net`` with two ``--socket-path``) switches between two guests; with
  ``--fault`` rules dropping 5%, reordering 5% and corrupting 2% of its frames, 1 MiB sent
  over TCP from one guest's busybox ``nc`` to the other's arrives byte-exact (md5sum), the
  guests' kernels count the corrupted segments as TCP checksum errors, and the counters
  line says what the faults did.
* ``test_mtu_9000_jumbo_frames_use_mergeable_buffers`` — ``host_mtu=9000``: 8000-byte pings
  both ways, NET_SET_MTU reaches the device, 8042-byte frames spread over several receive
  buffers.
* ``test_tap_bridges_guest_and_host_namespace`` — ``--tap`` inside a network namespace:
  ping both ways between the guest and the namespace's stack.

Facts these tests rely on: QEMU 7.2 with ``queues=2`` sends ADD_MEM_REG for the same region
once per queue pair; the device's negotiated features are reset when QEMU disconnects, so
they are checked while frames flow; busybox ``nc -l`` listens on a dual-stack IPv6 socket
(``/proc/net/tcp6``); busybox ``tftp`` adds a ``tsize`` option to its read request.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import terminate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netguest
from netguest import GUEST_FUNCTIONS, GUEST_IP, RESPONDER_IP, FrameLog, configure, ping_stats
from qemu_guest import (
    REPO_ROOT,
    console_values,
    guest_mac,
    require_qemu,
    start_guest,
    wait_for_socket,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import rdpcap
from tools import unavailable, wait_until

from vhostpy.cli import parse_counters_lines
from vhostpy.net import VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF
from vhostpy.netapp import RESPONDER_MAC, NetApp
from vhostpy.packets import EchoReply, verify_l4_checksums
from vhostpy.pcap import read_pcap

GUEST_TIMEOUT = 90
GUEST_MAC = guest_mac(0)
#: A host that exists only in the test: the guest gets a permanent ARP entry for it, so its
#: answers need no ARP exchange (which would add frames to the exact rx counts).
FAKE_IP = "10.0.2.9"
FAKE_MAC = "52:54:00:00:00:09"
TFTP_PORT = 6969
NC_PORT = 5000
NC_PAYLOAD = b"vhostpy-tcp-payload-7f3a\n"
VIRTIO_NET_HDR_MRG_LEN = 12
#: busybox tftp's read request for "hello": opcode 1, file, mode, and the tsize option.
RRQ = b"\x00\x01hello\x00octet\x00tsize\x000\x00"


@pytest.fixture
def net_app(tmp_path: Path) -> Iterator[Callable[..., NetApp]]:
    """Factory for in-process NetApps on ``tmp_path/netN.sock``; stopped and closed afterwards."""
    apps: list[NetApp] = []

    def make(count: int = 1, **kwargs: Any) -> NetApp:
        paths = [str(tmp_path / f"net{len(apps)}-{i}.sock") for i in range(count)]
        app = NetApp(socket_paths=paths, **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()
        app.close()


def _sock(app: NetApp, i: int = 0) -> str:
    path = app.servers[i].socket_path
    assert path is not None
    return str(path)


def _exit_counters(output: str) -> dict[str, Any]:
    """The counters of the one line `vhostpy net` prints at exit (see cli.counters_line)."""
    records = parse_counters_lines(output)
    assert [(r["device"], r["event"]) for r in records] == [("net", "exit")], output
    counters: dict[str, Any] = records[0]["counters"]
    return counters


def _rx_values(console: str) -> list[int]:
    return [int(v) for v in re.findall(r"^RX=(\d+)$", console, re.MULTILINE)]


# --------------------------------------------------------------------------------------------
# 1 + 6: guest -> responder ping, UDP to a Python handler, pcap checksums, two queue pairs


@pytest.mark.qemu
def test_guest_pings_responder_udp_and_pcap(net_app: Callable[..., NetApp],
                                            tmp_path: Path) -> None:
    require_qemu()
    pcap_path = tmp_path / "guest.pcap"
    app = net_app(num_queues=2, pcap=str(pcap_path))
    udp_log = FrameLog()
    features: list[int] = []  # what was negotiated while frames flowed (reset on disconnect)

    def on_frames(port: Any, frames: list[Any]) -> None:
        features.append(port.device.acked_features)
        udp_log(port, [f for f in frames if UDP in f])
    app.ports[0].add_handler(on_frames, scapy=True)
    app.start_thread()

    script = (
        'echo "QUEUES=$(ls /sys/class/net/eth0/queues | tr "\\n" " ")"\n'
        + configure()
        + f"ping -c 3 {RESPONDER_IP}\n"
        # tftp's read request is a UDP datagram to port 6969; nobody answers, so stop it.
        + f"tftp -g -r hello {RESPONDER_IP} {TFTP_PORT} & pid=$!\n"
        + "sleep 2; kill $pid\n"
    )
    with start_guest(script, net_sockets=[_sock(app)], timeout=GUEST_TIMEOUT,
                     netdev_options={"queues": 2}, net_options={"mq": "on", "vectors": 0},
                     extra_args=["-smp", "2"]) as guest:
        result = guest.wait()
    assert result.exit_code == 0, result.raw_console
    assert "QUEUES=rx-0 rx-1 tx-0 tx-1 " in result.console, result.console
    assert ping_stats(result.console) == [(3, 3)], result.console

    mq_csum = (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CSUM)
    assert features and all(f & mq_csum == mq_csum for f in features), features

    udp = udp_log.wait_for(lambda f: True, what="UDP frames")
    for frame in udp:  # tftp may have retransmitted; every copy is the same request
        assert frame[Ether].src == GUEST_MAC and frame[Ether].dst == RESPONDER_MAC
        assert (frame[IP].src, frame[IP].dst) == (GUEST_IP, RESPONDER_IP)
        assert frame[UDP].dport == TFTP_PORT
        assert bytes(frame[UDP].payload) == RRQ, bytes(frame[UDP].payload)
        assert verify_l4_checksums(bytes(frame)) is True
    counters = app.call(app.counters)
    # The guest left its UDP checksums to the device (NEEDS_CSUM): each such frame was counted
    # (by the C burst or the Python path, whichever runs), and the frames above, checked
    # after completion, carry valid checksums.
    from_guest = counters["ports"][0]["from_guest"]  # type: ignore[index]
    assert from_guest["checksums"] >= len(udp), from_guest
    app.stop()
    app.close()

    frames = [data for _, data in read_pcap(pcap_path)]
    assert len(frames) == counters["pcap"]["frames"]  # type: ignore[index]
    packets = rdpcap(str(pcap_path))
    assert len(packets) == len(frames)
    checked = {"icmp": 0, "udp": 0}
    for data, pkt in zip(frames, packets):
        assert bytes(pkt) == data
        verdict = verify_l4_checksums(data)
        assert verdict in (True, None), pkt.summary()
        if ICMP in pkt and pkt[IP].src in (GUEST_IP, RESPONDER_IP):
            assert verdict is True
            checked["icmp"] += 1
        if UDP in pkt and pkt[UDP].dport == TFTP_PORT:
            assert verdict is True
            checked["udp"] += 1
    assert checked["icmp"] == 6  # 3 requests from the guest, 3 replies from the responder
    assert checked["udp"] == len(udp)
    requests = [p for p in packets if ICMP in p and p[ICMP].type == 8]
    replies = [p for p in packets if ICMP in p and p[ICMP].type == 0]
    assert [p[ICMP].seq for p in requests] == [0, 1, 2]
    assert [(p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) for p in replies] == \
        [(p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) for p in requests]


# --------------------------------------------------------------------------------------------
# 2: the back-end pings the guest; injected frames reach the guest's stack and a listener


@pytest.mark.qemu
def test_backend_pings_guest_and_injected_frames_reach_guest(
        net_app: Callable[..., NetApp]) -> None:
    require_qemu()
    app = net_app()
    port = app.ports[0]
    seen = FrameLog()
    port.add_handler(seen, scapy=True)
    app.start_thread()

    # busybox nc listens on a dual-stack IPv6 socket: the listener shows in /proc/net/tcp6.
    listening = f"grep -qE ':{NC_PORT:04X} 0+:0000 0A' /proc/net/tcp /proc/net/tcp6"
    script = (
        configure()
        + f"arp -s {FAKE_IP} {FAKE_MAC}\n"
        + f"nc -l -p {NC_PORT} </dev/null >/tmp/nc.out 2>&1 &\n"
        + f"until {listening}; do sleep 0.1; done\n"
        + "echo GUEST-READY\n"
        # Print the receive counter until nc got the payload (or about 60 s passed).
        + "n=0\n"
        + f"until grep -q '{NC_PAYLOAD.decode().strip()}' /tmp/nc.out; do\n"
        + '    echo "RX=$(cat /sys/class/net/eth0/statistics/rx_packets)"\n'
        + "    sleep 0.2; n=$((n + 1)); [ $n -lt 300 ] || break\n"
        + "done\n"
        + 'echo "NC-GOT=$(cat /tmp/nc.out)"\n'
    )
    with start_guest(script, net_sockets=[_sock(app)], timeout=GUEST_TIMEOUT) as guest:
        console = guest.wait_for_text("GUEST-READY")
        guest.wait_for_text("RX=")

        # -- injected ICMP echo requests: the guest's only received frames so far ------------
        assert app.call(lambda: port.to_guest.frames) == 0
        first_rx = _rx_values(guest.console_so_far())[0]
        assert first_rx == 0, console
        ident = 0x4242
        requests = [Ether(dst=GUEST_MAC, src=FAKE_MAC) / IP(src=FAKE_IP, dst=GUEST_IP)
                    / ICMP(type=8, id=ident, seq=seq) / Raw(b"vhostpy-inject-%d" % seq)
                    for seq in (1, 2, 3)]
        port.send_threadsafe(requests)
        replies = seen.wait_for(lambda f: ICMP in f and f[ICMP].type == 0
                                and f[ICMP].id == ident, count=3, what="injected echo replies")
        assert [(r[IP].src, r[IP].dst, r[Ether].dst, r[ICMP].seq, bytes(r[ICMP].payload))
                for r in replies] == [(GUEST_IP, FAKE_IP, FAKE_MAC, seq,
                                       b"vhostpy-inject-%d" % seq) for seq in (1, 2, 3)]
        assert all(verify_l4_checksums(bytes(r)) is True for r in replies)
        # The guest's receive counter reaches 3 (it sent the replies, so it counted the
        # requests) and says exactly 3: the injected frames and nothing else.
        rx = wait_until(lambda: [v for v in _rx_values(guest.console_so_far()) if v >= 3], 20,
                        "an RX= line counting the 3 injected frames")
        assert rx[0] == 3, rx
        assert app.call(lambda: port.to_guest.frames) == 3

        # -- the responder pings the guest --------------------------------------------------
        for seq in (1, 2, 3):
            app.call(functools.partial(app.ping, GUEST_IP, seq=seq))
        responder = app.responder
        assert responder is not None
        got = wait_until(
            lambda: app.call(lambda: list(responder.echo_replies))
            if len(responder.echo_replies) >= 3 else None, 20, "echo replies from the guest")
        assert got == [EchoReply(GUEST_IP, 0x7670, seq, 56) for seq in (1, 2, 3)]

        # -- a TCP handshake and one data segment to the guest's nc listener -----------------
        def tcp(flags: str, seq: int, ack: int = 0, payload: bytes = b"") -> Any:
            pkt = (Ether(dst=GUEST_MAC, src=FAKE_MAC) / IP(src=FAKE_IP, dst=GUEST_IP)
                   / TCP(sport=40000, dport=NC_PORT, flags=flags, seq=seq, ack=ack,
                         window=65535))
            return pkt / Raw(payload) if payload else pkt

        def from_nc(f: Any) -> bool:
            return TCP in f and f[TCP].sport == NC_PORT and f[TCP].dport == 40000

        port.send_threadsafe([tcp("S", 1000)])
        synack = seen.wait_for(lambda f: from_nc(f) and f[TCP].flags == "SA", what="SYN-ACK")[0]
        assert synack[TCP].ack == 1001 and synack[IP].dst == FAKE_IP
        assert verify_l4_checksums(bytes(synack)) is True
        port.send_threadsafe([tcp("PA", 1001, synack[TCP].seq + 1, NC_PAYLOAD)])
        seen.wait_for(lambda f: from_nc(f) and f[TCP].ack == 1001 + len(NC_PAYLOAD),
                      what="the guest's ACK of the payload")
        result = guest.wait()
    assert result.exit_code == 0, result.raw_console
    assert f"NC-GOT={NC_PAYLOAD.decode().strip()}" in result.lines, result.console


# --------------------------------------------------------------------------------------------
# 3: two guests on one `vhostpy net` process (the real command line)


#: The guest-to-guest TCP transfer under faults: 1 MiB of random bytes from the second guest
#: to a busybox `nc -l` in the first; its frames (both ways) only, so the pings stay exact.
XFER_PORT = 5001
XFER_KIB = 1024
#: 5% of the transfer's frames lost, 5% held back behind up to 4 later ones and 2% with a
#: bit flipped (the receiving kernel must find the TCP checksum wrong); dir=tx: once per hop
#: (every frame leaves exactly one guest port).
XFER_FAULTS = (f"drop,p=0.05,dir=tx,seed=14,filter=tcp port {XFER_PORT}",
               f"reorder,p=0.05,depth=4,dir=tx,seed=15,filter=tcp port {XFER_PORT}",
               f"corrupt,p=0.02,dir=tx,seed=16,filter=tcp port {XFER_PORT}")
#: The guest's TCP segments with a bad checksum (/proc/net/snmp Tcp: InCsumErrors).
TCP_CSUM_ERRORS = ("echo TCP-CSUM-ERRORS=$(awk '/^Tcp:/ { if (!c) { for (i = 2; i <= NF; "
                   "i++) if ($i == \"InCsumErrors\") c = i } else { print $c; exit } }' "
                   "/proc/net/snmp)\n")


def _until_answers(peer: str) -> str:
    """Guest shell: ping ``peer`` once a second until it answers (60 tries, then exit 4)."""
    return ("n=0\n"
            f"until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do\n"
            "    n=$((n + 1)); [ $n -lt 60 ] || { echo PEER-NEVER-ANSWERED; exit 4; }\n"
            "done\n")


def _ping_peer(own: str, peer: str, *, before: str = "", after: str = "",
               peer_pings: int = 4) -> str:
    """Guest script: ping ``peer`` until it answers, then 3 more, run ``after``, and stay up
    until this guest has answered ``peer_pings`` echo requests of the peer's."""
    return (GUEST_FUNCTIONS + configure(own) + before
            + _until_answers(peer)
            + f"ping -c 3 {peer}\n"
            + after
            + f"wait_echo_replies {peer_pings} 60\n"
            + TCP_CSUM_ERRORS)


#: The receiving guest listens before it pings (so it listens before the sender can reach
#: it), then waits for the whole file. Its nc's stdin must stay open (a FIFO opened read-
#: write: never EOF): at EOF busybox nc shuts its sending side, and the sender's nc quits at
#: that FIN, mid-file. Not `sleep | nc`: ash's `wait` would wait for the sleep too.
XFER_LISTEN = ("mkfifo /tmp/hold\n"
               f"nc -l -p {XFER_PORT} <> /tmp/hold > /tmp/got &\n"
               "nc_pid=$!\n")
XFER_RECEIVED = ("wait $nc_pid\n"
                 "echo XFER-MD5=$(md5sum /tmp/got | cut -d' ' -f1)\n"
                 "echo XFER-BYTES=$(wc -c < /tmp/got)\n")
XFER_MAKE = (f"dd if=/dev/urandom of=/tmp/data bs=1024 count={XFER_KIB} 2>/dev/null\n"
             "echo XFER-MD5=$(md5sum /tmp/data | cut -d' ' -f1)\n")
XFER_SEND = ("t0=$(cut -d' ' -f1 /proc/uptime)\n"
             "n=0\n"
             f"until nc 10.0.2.15 {XFER_PORT} < /tmp/data; do\n"
             "    n=$((n + 1)); [ $n -lt 20 ] || { echo XFER-NEVER-CONNECTED; exit 5; }\n"
             "    sleep 0.5\n"
             "done\n"
             "t1=$(cut -d' ' -f1 /proc/uptime)\n"
             "echo XFER-SECONDS=$(awk \"BEGIN { print $t1 - $t0 }\")\n"
             + _until_answers("10.0.2.15"))
#: The receiver answers the sender's first ping, its 3 and the one after the transfer: it
#: stays up until the sender's nc has seen its FIN. Powering off sooner lost a run: the
#: faults may drop that FIN (it is port 5001's too), and nothing would have resent it.
XFER_SENDER_PINGS = 5


@pytest.mark.qemu
def test_two_guests_ping_each_other_through_one_cli_process(backend: Any,
                                                            tmp_path: Path) -> None:
    """...and move 1 MiB over TCP between them byte-exact while `--fault` rules drop 5%,
    reorder 5% and corrupt 2% of that transfer's frames (issue 14: net faults on a real
    guest)."""
    require_qemu()
    second = str(tmp_path / "second.sock")
    b = backend("net", "--socket-path", second,
                *[arg for spec in XFER_FAULTS for arg in ("--fault", spec)])
    wait_for_socket(second, proc=b.proc)
    macs = ("52:54:00:12:34:61", "52:54:00:12:34:62")
    with start_guest(_ping_peer("10.0.2.15", "10.0.2.16", before=XFER_LISTEN,
                                after=XFER_RECEIVED, peer_pings=XFER_SENDER_PINGS),
                     timeout=GUEST_TIMEOUT, net_sockets=[(b.path, {"mac": macs[0]})]) as g1, \
         start_guest(_ping_peer("10.0.2.16", "10.0.2.15", before=XFER_MAKE,
                                after=XFER_SEND),
                     timeout=GUEST_TIMEOUT, net_sockets=[(second, {"mac": macs[1]})]) as g2:
        r1 = g1.wait()
        r2 = g2.wait()
    assert r1.exit_code == 0, r1.raw_console
    assert r2.exit_code == 0, r2.raw_console
    assert ping_stats(r1.console)[-1] == (3, 3), r1.console
    assert ping_stats(r2.console)[-1] == (3, 3), r2.console
    assert "64 bytes from 10.0.2.16" in r1.console and "64 bytes from 10.0.2.15" in r2.console
    got, sent = console_values(r1.console), console_values(r2.console)
    assert got["XFER-BYTES"] == str(XFER_KIB * 1024), r1.console
    assert got["XFER-MD5"] == sent["XFER-MD5"], (r1.console, r2.console)
    assert float(sent["XFER-SECONDS"]) > 0, r2.console

    assert b.stop() == 0, b.log_path.read_text()
    assert not os.path.exists(b.path) and not os.path.exists(second)
    output = b.log_path.read_text()
    counters = _exit_counters(output)
    p0, p1 = counters["ports"]
    assert p0["port"] == "port0" and p1["port"] == "port1"
    # At least the 3 + 3 echo requests and replies each guest sent and received, no drops
    # by the device (the faults' drops are their own counters).
    for p in (p0, p1):
        assert p["from_guest"]["frames"] >= 6 and p["to_guest"]["frames"] >= 6, p
        assert p["from_guest"]["drops"] == {} and p["to_guest"]["drops"] == {}, p
    assert counters["switch"]["forwarded"] >= 12
    # The faults acted on the transfer's frames, about as often as asked, and held none
    # back for good; each port counts what it did to the frames its guest sent.
    faults = counters["faults"]
    drop, reorder, corrupt = faults["faults"]
    assert [drop["spec"], reorder["spec"], corrupt["spec"]] == list(XFER_FAULTS)
    assert drop["seen"] > XFER_KIB * 1024 // 1500, drop   # at least the data segments
    assert 0.02 * drop["seen"] < drop["hits"] < 0.09 * drop["seen"], drop
    assert faults["dropped"] == drop["hits"] and faults["reordered"] == reorder["hits"] > 0
    assert faults["held"] == 0 and faults["duplicated"] == 0
    # Every corrupted frame reached a guest whose kernel found its TCP checksum wrong (but
    # for the last ACKs of the teardown, which may land after the guests counted).
    errors = int(got["TCP-CSUM-ERRORS"]) + int(sent["TCP-CSUM-ERRORS"])
    assert faults["corrupted"] == corrupt["hits"] > 0, corrupt
    assert corrupt["hits"] - 2 <= errors <= corrupt["hits"], (errors, corrupt)
    assert sum(p["faults"]["from_guest"]["dropped"] for p in (p0, p1)) == drop["hits"]
    assert p0["faults"]["to_guest"]["dropped"] == p1["faults"]["to_guest"]["dropped"] == 0
    print(f"1 MiB guest-to-guest under faults: {sent['XFER-SECONDS']} s, "
          f"{drop['hits']} of {drop['seen']} frames dropped, {reorder['hits']} reordered, "
          f"{corrupt['hits']} corrupted ({errors} TCP checksum errors in the guests)")


# --------------------------------------------------------------------------------------------
# 4: MTU 9000 with mergeable receive buffers


@pytest.mark.qemu
def test_mtu_9000_jumbo_frames_use_mergeable_buffers(net_app: Callable[..., NetApp]) -> None:
    require_qemu()
    app = net_app()
    dev = app.devices[0]
    app.start_thread()

    script = (GUEST_FUNCTIONS + configure(mtu=9000)
              + f"ping -c 2 -s 8000 {RESPONDER_IP}\n"
              + "echo GUEST-READY\n"
              # OutEchoReps counts the replies the guest sent: to the responder's one ping.
              + "wait_echo_replies 1 60\n"
              + "cat /sys/class/net/eth0/mtu\n")
    with start_guest(script, net_sockets=[_sock(app)], timeout=GUEST_TIMEOUT,
                     net_options={"host_mtu": 9000}) as guest:
        guest.wait_for_text("GUEST-READY")
        assert app.call(lambda: dev.mtu) == 9000  # NET_SET_MTU from QEMU's host_mtu
        assert app.call(lambda: dev.has_feature(VIRTIO_NET_F_MRG_RXBUF))  # while attached
        app.call(lambda: app.ping(GUEST_IP, seq=7, payload_size=8000))
        responder = app.responder
        assert responder is not None
        wait_until(lambda: len(responder.echo_replies) >= 1, 20, "the 8000-byte reply")
        result = guest.wait()
    assert result.exit_code == 0, result.raw_console
    assert ping_stats(result.console) == [(2, 2)], result.console
    assert "8008 bytes from 10.0.2.2" in result.console  # busybox: payload + 8-byte ICMP header
    assert result.lines[-1] == "9000"
    assert app.call(lambda: list(responder.echo_replies)) == [EchoReply(GUEST_IP, 0x7670, 7, 8000)]

    # 2 replies to the guest's pings + the responder's own request: 14 + 20 + 8 + 8000 bytes
    # each, larger than any one receive buffer the guest posts, so each was spread over
    # several (the `merged` counter, kept by the C and the Python placement alike); every
    # smaller frame fitted in one. The guest's ping statistics above show they arrived whole.
    assert app.call(lambda: app.ports[0].to_guest.merged) == 3
    counters = app.ports[0].to_guest
    assert counters.drops == {} and counters.bytes >= 3 * 8042


# --------------------------------------------------------------------------------------------
# 5: a tap device in a network namespace


@pytest.fixture
def netns() -> Iterator[str]:
    reason = netguest.netns_available()
    if reason is not None:
        unavailable(f"network namespaces (root and CAP_NET_ADMIN): {reason}")
    with netguest.network_namespace() as name:
        yield name


@pytest.mark.qemu
def test_tap_bridges_guest_and_host_namespace(netns: str, tmp_path: Path) -> None:
    require_qemu()
    sock = str(tmp_path / "tap.sock")
    log_path = tmp_path / "tap-backend.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "vhostpy", "net",
             "--socket-path", sock, "--tap", "vtap0", "--no-respond", "-v"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=REPO_ROOT)
    try:
        wait_for_socket(sock, timeout=15, proc=proc)
        wait_until(
            lambda: netguest.in_netns(netns, "ip", "addr", "add", "10.0.2.1/24",
                                      "dev", "vtap0").returncode == 0, 10, "vtap0 to exist")
        netguest.in_netns(netns, "ip", "link", "set", "vtap0", "up", check=True)

        script = (GUEST_FUNCTIONS + configure()
                  + "ping -c 3 10.0.2.1\n"
                  + "echo GUEST-PINGED\n"
                  + "wait_echo_replies 3 60\n")
        with start_guest(script, net_sockets=[sock], timeout=GUEST_TIMEOUT) as guest:
            guest.wait_for_text("GUEST-PINGED")
            r = netguest.in_netns(netns, *netguest.host_ping(), "-c", "3", "-i", "0.2",
                                  "-W", "5", GUEST_IP)
            assert ping_stats(r.stdout) == [(3, 3)], r.stdout + r.stderr
            result = guest.wait()
        assert result.exit_code == 0, result.raw_console
        assert ping_stats(result.console) == [(3, 3)], result.console
        assert "64 bytes from 10.0.2.1" in result.console
    finally:
        terminate(proc)
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output
    assert not os.path.exists(sock), "back-end left its socket behind"
    counters = _exit_counters(output)
    # 3 + 3 echo requests/replies each way at least (plus ARP, IPv6 chatter); none dropped.
    assert counters["tap"]["sent"] >= 6 and counters["tap"]["received"] >= 6, counters
    assert "responder" not in counters
