"""A network service written on vhostpy's public API: a small host on the guest's network.

`make_device()` returns a virtio-net device whose other end is a host at 10.0.2.2:

* it answers ARP (and ping) for its address at once: the handler returns the replies;
* it serves files over TFTP (UDP port 69) asynchronously: an `async def` handler awaits
  each file (a stand-in for a database or a network call) and returns the answer, which
  vhostpy sends to the guest when it is ready. Files are one TFTP block (511 bytes at most).

Standard library only. Serve it with the command line or run this file (`vhostpy.serve`)::

    vhostpy serve examples.net_service:make_device --socket-path /tmp/net.sock
    python examples/net_service.py /tmp/net.sock

attach it to QEMU with ``-chardev socket,id=net0,path=/tmp/net.sock -netdev
vhost-user,id=hn0,chardev=net0 -device virtio-net-pci,netdev=hn0,vectors=0`` and, in the guest::

    ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
    tftp -g -r motd -l /tmp/motd 10.0.2.2 && cat /tmp/motd
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import NamedTuple

import vhostpy
from vhostpy.net import NetDevice, NetPort
from vhostpy.packets import Responder, internet_checksum, parse_mac

SERVICE_IP = "10.0.2.2"
SERVICE_MAC = "52:54:00:12:35:02"
TFTP_PORT = 69
FILES = {"motd": b"Hello from a network service written in Python.\n"}

#: IPv4 header: version+IHL, TOS, length, id, fragment, TTL, protocol, checksum, source, dest.
IPV4 = struct.Struct("!BBHHHBBH4s4s")
UDP = struct.Struct("!HHHH")     # source port, destination port, length, checksum
TFTP = struct.Struct("!HH")      # opcode, block number (or error code)
DATA, ERROR = 3, 5               # TFTP opcodes (RFC 1350); a read request starts 00 01


class Datagram(NamedTuple):
    """A UDP datagram from the guest: who sent it, and what."""

    mac: bytes
    ip: bytes
    port: int
    payload: bytes


class NetService(NetDevice):
    """virtio-net whose host side is a tiny IPv4 host (`SERVICE_IP`)."""

    name = "example-net-service"

    def __init__(self) -> None:
        super().__init__()
        self.responder = Responder(ip=SERVICE_IP, mac=SERVICE_MAC)
        self.ip = self.responder.ip_bytes
        self.mac = parse_mac(SERVICE_MAC)
        self.files_sent = 0
        self.not_found = 0
        self.port.add_handler(self.answer_now)
        self.port.add_handler(self.answer_later)

    def answer_now(self, port: NetPort, frames: list[bytes]) -> list[bytes]:
        """ARP and ping for SERVICE_IP: the frames returned go to the guest at once."""
        return [reply for frame in frames for reply in self.responder.handle(frame)]

    async def answer_later(self, port: NetPort, frames: list[bytes]) -> list[bytes]:
        """TFTP read requests. This coroutine runs on vhostpy's asyncio loop; the frames it
        returns go to the guest when it ends (the device keeps serving meanwhile)."""
        replies = []
        for frame in frames:
            request = self.udp_to_us(frame, TFTP_PORT)
            if request is None or request.payload[:2] != b"\x00\x01":
                continue               # not a read request (e.g. the client's ACK of our block)
            name = request.payload[2:].split(b"\0", 1)[0].decode(errors="replace")
            data = await self.lookup(name)
            if data is None:
                self.not_found += 1
                answer = TFTP.pack(ERROR, 1) + b"File not found\0"
            else:
                self.files_sent += 1
                answer = TFTP.pack(DATA, 1) + data[:511]   # < 512 bytes: the last block
            replies.append(self.udp_reply(request, TFTP_PORT, answer))
        return replies

    async def lookup(self, name: str) -> bytes | None:
        """The contents of file `name` (None: there is no such file)."""
        await asyncio.sleep(0.05)      # stands for a database or a network call
        return FILES.get(name)

    # -- frames ---------------------------------------------------------------------------
    def udp_to_us(self, frame: bytes, port: int) -> Datagram | None:
        """The datagram in `frame` if it is IPv4/UDP to SERVICE_IP:`port` (else None)."""
        if len(frame) < 14 + IPV4.size or frame[12:14] != b"\x08\x00":
            return None
        vihl, _, _, _, frag, _, proto, _, src, dst = IPV4.unpack_from(frame, 14)
        start = 14 + (vihl & 0x0F) * 4
        if proto != 17 or dst != self.ip or frag & 0x3FFF or len(frame) < start + UDP.size:
            return None
        sport, dport, length, _ = UDP.unpack_from(frame, start)
        if dport != port:
            return None
        return Datagram(frame[6:12], src, sport, frame[start + UDP.size:start + length])

    def udp_reply(self, to: Datagram, sport: int, payload: bytes) -> bytes:
        """An Ethernet frame carrying `payload` from SERVICE_IP:`sport` back to `to`."""
        length = UDP.size + len(payload)
        pseudo = self.ip + to.ip + struct.pack("!HH", 17, length)
        checksum = internet_checksum(pseudo + UDP.pack(sport, to.port, length, 0) + payload)
        udp = UDP.pack(sport, to.port, length, checksum or 0xFFFF) + payload
        ip = bytearray(IPV4.pack(0x45, 0, IPV4.size + length, 0, 0x4000, 64, 17, 0,
                                 self.ip, to.ip))
        ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
        return to.mac + self.mac + b"\x08\x00" + bytes(ip) + udp

    def counters(self) -> dict[str, object]:
        """Printed as JSON by `vhostpy serve` on exit and on SIGUSR1."""
        return {"files_sent": self.files_sent, "not_found": self.not_found,
                "port": self.port.counters()}


def make_device() -> NetService:
    """For `vhostpy serve examples.net_service:make_device`."""
    return NetService()


def main(argv: list[str]) -> int:
    """`python examples/net_service.py SOCKET_PATH`."""
    if len(argv) != 1:
        print("usage: python examples/net_service.py SOCKET_PATH", file=sys.stderr)
        return 2
    device = make_device()
    vhostpy.serve(device, socket_path=argv[0])   # returns after SIGINT or SIGTERM
    print(f"sent {device.files_sent} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
