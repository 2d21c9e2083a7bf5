"""`vhostpy net` as a library: virtio-net ports on vhost-user sockets, wired to endpoints.

`NetApp` owns one event loop, one `Server` + `NetDevice` per socket, and the endpoints:

* a learning `Switch` between every guest port, the built-in responder and the tap port
  (so several guests on one process talk to each other);
* the `Responder` (ARP and ICMP echo for `respond_ip`, on by default), which can also ping
  guests (`ping()`);
* a `PcapWriter` that records every frame in both directions on every guest port;
* a `TapPort` to the host's network stack;
* `reflect`: every frame goes back to the port it came from with its MACs swapped (no switch);
* `faults`: one `netfaults.NetFaults` rule set on every guest port, both directions (frames
  dropped, duplicated, reordered, corrupted or delayed on purpose), rules added and cleared
  at run time on the loop's thread (`app.call(lambda: app.faults.add(rule))`).

Python code adds handlers to `app.ports[i]` (see `NetPort`). `run()` serves on the calling
thread until `stop()`; `start_thread()` runs the loop in a background thread, after which
`call()` runs a function on the loop's thread and returns its result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from vhostpy.errors import ConfigurationError
from vhostpy.loop import EventLoop
from vhostpy.net import DEFAULT_MTU, NetDevice, NetPort
from vhostpy.netfaults import NetFault, NetFaults
from vhostpy.packets import Responder
from vhostpy.pcap import PcapWriter
from vhostpy.server import Server
from vhostpy.switch import BaseSwitch, Switch
from vhostpy.tap import TapPort

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_RESPOND_IP = "10.0.2.2"
RESPONDER_MAC = "52:54:00:12:35:02"


class ResponderPort:
    """The responder as a switch port: frames in, its replies forwarded back by the switch."""

    def __init__(self, responder: Responder, switch: BaseSwitch) -> None:
        self.name = "responder"
        self.responder = responder
        self.switch = switch

    def send(self, frames: Sequence[bytes]) -> int:
        replies: list[bytes] = []
        for frame in frames:
            replies += self.responder.handle(frame)
        if replies:
            self.switch.forward(self, replies)
        return len(frames)


class NetApp:
    """Guest ports on vhost-user sockets plus the endpoints chosen at construction."""

    def __init__(self, *, socket_paths: Sequence[str] = (), fds: Sequence[int] = (),
                 num_queues: int = 1, queue_size: int = 1024, respond_ip: str | None =
                 DEFAULT_RESPOND_IP, pcap: str | None = None, tap: str | None = None,
                 reflect: bool = False, mtu: int | None = None,
                 faults: NetFaults | Iterable[NetFault] = (),
                 loop: EventLoop | None = None) -> None:
        if not socket_paths and not fds:
            raise ConfigurationError("give at least one --socket-path or --fd")
        if reflect and (tap is not None or len(socket_paths) + len(fds) > 1):
            raise ConfigurationError("--reflect sends frames back to their own port; it cannot "
                                     "be combined with --tap or several sockets")
        self.loop = loop or EventLoop()
        self.reflect = reflect
        self.faults = faults if isinstance(faults, NetFaults) else NetFaults(faults)
        self.switch = Switch()
        self.devices: list[NetDevice] = []
        self.servers: list[Server] = []
        self.pcap: PcapWriter | None = None
        self.tap: TapPort | None = None
        self.responder: Responder | None = None
        self.responder_port: ResponderPort | None = None
        self._thread: threading.Thread | None = None
        try:
            self._build(socket_paths, fds, num_queues, queue_size, respond_ip, pcap, tap, mtu)
        except BaseException:
            self.close()
            raise

    def _build(self, socket_paths: Sequence[str], fds: Sequence[int], num_queues: int,
               queue_size: int, respond_ip: str | None, pcap: str | None, tap: str | None,
               mtu: int | None) -> None:
        places = [("socket_path", p) for p in socket_paths] + [("fd", f) for f in fds]
        for i in range(len(places)):
            mac = f"52:54:00:12:34:{0x56 + i:02x}"
            self.devices.append(NetDevice(mac=mac, mtu=mtu, queue_pairs=num_queues,
                                          queue_size=queue_size, name=f"port{i}"))
        if respond_ip is not None:
            self.responder = Responder(ip=respond_ip, mac=RESPONDER_MAC)
            self.responder_port = ResponderPort(self.responder, self.switch)
            self.switch.attach(self.responder_port)
        if pcap is not None:
            try:
                self.pcap = PcapWriter(pcap)
            except OSError as exc:
                raise ConfigurationError(f"--pcap {pcap}: {exc.strerror}") from exc
        if tap is not None:
            self.tap = TapPort.open(tap)
            self.switch.attach(self.tap)
            tap_port = self.tap
            self.loop.add_reader(tap_port.fd, lambda: self._from_tap(tap_port))
        for device in self.devices:
            port = device.port
            port.call_soon_threadsafe = self.loop.call_soon_threadsafe
            port.call_later = self.loop.call_later
            port.set_faults(self.faults)
            if self.pcap is not None:
                port.set_capture(self.pcap)
            if self.reflect:
                port.set_consumer("reflect")
            else:
                port.set_consumer("switch", self.switch)
                self.switch.attach(port)
        for device, (kind, where) in zip(self.devices, places):
            self.servers.append(Server(device, self.loop, **{kind: where}))  # type: ignore[arg-type]

    @property
    def ports(self) -> list[NetPort]:
        """The guest ports, in socket order."""
        return [d.port for d in self.devices]

    # -- frame paths -----------------------------------------------------------------------
    def _from_tap(self, tap: TapPort) -> None:
        tap.forward_to(self.switch)

    def ping(self, ip: str, *, seq: int = 1, payload_size: int = 56) -> None:
        """Send one ICMP echo request from the responder to `ip` (loop thread only)."""
        if self.responder is None or self.responder_port is None:
            raise ConfigurationError("the responder is off (--no-respond): nothing can ping")
        frames = self.responder.ping(ip, seq=seq, payload_size=payload_size)
        if frames:
            self.switch.forward(self.responder_port, frames)

    # -- running ---------------------------------------------------------------------------
    def run(self) -> None:
        """Serve on this thread until `stop()`."""
        self.loop.run()

    def start_thread(self) -> threading.Thread:
        """Serve on a background thread (for embedding and tests)."""
        self._thread = threading.Thread(target=self.loop.run, name="vhostpy-net", daemon=True)
        self._thread.start()
        return self._thread

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn()` on the loop's thread and return its result (from any other thread)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                future.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        result: T = future.result(timeout)
        return result

    def stop(self) -> None:
        """Make `run()` return (any thread)."""
        self.loop.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
            self._thread = None

    def counters(self) -> dict[str, object]:
        """All counters: per guest port, the switch, the faults, the responder, tap and pcap."""
        out: dict[str, object] = {"ports": [p.counters() for p in self.ports],
                                  "switch": self.switch.counters(),
                                  "faults": self.faults.counters()}
        if self.responder is not None:
            out["responder"] = self.responder.counters()
        if self.tap is not None:
            out["tap"] = {"sent": self.tap.sent, "received": self.tap.received,
                          "drops": self.tap.drops, "truncated": self.tap.truncated}
        if self.pcap is not None:
            out["pcap"] = {"frames": self.pcap.frames}
        return out

    def close(self) -> None:
        """Stop serving, remove sockets, complete the pcap file, close the tap."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self.pcap is not None:
            self.pcap.close()
        if self.tap is not None:
            self.loop.remove_reader(self.tap.fd)
            self.tap.close()
        self.loop.close()


__all__ = ["DEFAULT_MTU", "DEFAULT_RESPOND_IP", "NetApp", "ResponderPort"]
