"""`vhostpy lguest`: the command line of the lguest Launcher (see `lguest_launcher`).

`add_parser` adds the command to the parser `cli` builds; `lguest_options` turns its
arguments into `LaunchOptions` (ConfigurationError if they contradict each other); `run`
launches the guest on /dev/lguest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vhostpy.cliargs import Parser, ipv4, positive_int, setup_logging
from vhostpy.errors import ConfigurationError

if TYPE_CHECKING:
    from vhostpy.lguest_launcher import LaunchOptions

__all__ = ["DeviceAction", "add_parser", "lguest_options", "run"]


class DeviceAction(argparse.Action):
    """Appends (kind, value) to `devices`, keeping the command line's device order."""

    def __init__(self, option_strings: Sequence[str], dest: str, kind: str = "",
                 **kwargs: object) -> None:
        self.kind = kind
        super().__init__(option_strings, "devices", **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        devices = list(getattr(namespace, "devices", None) or [])
        devices.append((self.kind, values if isinstance(values, str) else ""))
        namespace.devices = devices


def _memory_mib(text: str) -> int:
    value = positive_int(text)
    from vhostpy.lguest_launcher import max_memory_mib
    if value > max_memory_mib():
        raise argparse.ArgumentTypeError(f"{value} MiB is more than the {max_memory_mib()} MiB "
                                         "a 32-bit Launcher can map")
    return value


def _vhost_user(text: str) -> str:
    from vhostpy.lguest_launcher import parse_vhost_user
    try:
        parse_vhost_user(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).partition(": ")[2]) from None
    return text


def add_parser(sub: argparse._SubParsersAction[Parser], help: str) -> None:
    lg = sub.add_parser(
        "lguest", help=help,
        description="Run an lguest guest (3.x generation): the console is always the first "
        "device, on stdin/stdout; then the devices in command-line order.")
    lg.add_argument("-m", "--memory", type=_memory_mib, default=64, metavar="MiB",
                    help="guest RAM in MiB (default 64)")
    lg.add_argument("--initrd", metavar="FILE", help="an initial RAM disk for the kernel")
    lg.add_argument("--block", action=DeviceAction, kind="block", metavar="FILE",
                    help="a virtio-blk device over a raw image (repeatable)")
    lg.add_argument("--block-ro", action=DeviceAction, kind="block-ro", metavar="FILE",
                    help="a read-only virtio-blk device (VIRTIO_BLK_F_RO; repeatable)")
    lg.add_argument("--net", action=DeviceAction, kind="net", nargs=0,
                    help="a virtio-net port; several --net ports share one switch")
    lg.add_argument("--rng", action=DeviceAction, kind="rng", nargs=0,
                    help="a virtio-rng device fed by os.urandom")
    lg.add_argument("--vhost-user", action=DeviceAction, kind="vhost-user",
                    type=_vhost_user, metavar="TYPE:SOCKET",
                    help="a device (blk, net or rng) served by a vhost-user back-end")
    lg.add_argument("--respond", type=ipv4, default=None, metavar="IP",
                    help="--net: the built-in responder answers ARP and ping for IP "
                    "(default 10.0.2.2)")
    lg.add_argument("--no-respond", action="store_true", help="--net: no responder")
    lg.add_argument("--pcap", metavar="FILE", help="--net: record every frame to a pcap file")
    lg.add_argument("--tap", metavar="IFNAME", help="--net: bridge the ports to a tap device")
    lg.add_argument("--reflect", action="store_true",
                    help="--net: send every frame back with its MAC addresses swapped")
    lg.add_argument("--no-eventfd", action="store_true",
                    help="never register LHREQ_EVENTFD: every notify goes through pread")
    lg.add_argument("--layout", choices=("3.x", "2.6.24"), default="3.x",
                    help="device page generation (only 3.x boots; see the docs)")
    lg.add_argument("-v", "--verbose", action="count", default=0,
                    help="log more: -v for devices, -vv for ring state changes")
    lg.add_argument("kernel", metavar="KERNEL", help="a vmlinux (ELF) or bzImage")
    lg.add_argument("cmdline", nargs=argparse.REMAINDER, metavar="ARG",
                    help="the kernel command line")
    lg.set_defaults(devices=[])


def lguest_options(args: argparse.Namespace) -> LaunchOptions:
    """The parsed `vhostpy lguest` command line as LaunchOptions; ConfigurationError if bad."""
    from vhostpy.lguest_launcher import LaunchOptions, NetOptions

    if args.layout != "3.x":
        raise ConfigurationError(
            f"--layout {args.layout}: a 2.6.24 guest needs the Launcher to build its initial "
            "page tables and pass pgdir to LHREQ_INITIALIZE, which vhostpy does not do; "
            "only --layout 3.x boots")
    nets = sum(1 for kind, _ in args.devices if kind == "net")
    given = [name for name, value in (("--respond", args.respond), ("--pcap", args.pcap),
                                      ("--tap", args.tap)) if value is not None]
    given += [name for name, flag in (("--no-respond", args.no_respond),
                                      ("--reflect", args.reflect)) if flag]
    if given and not nets:
        raise ConfigurationError(f"{given[0]} is a network option: it needs --net")
    if args.respond is not None and args.no_respond:
        raise ConfigurationError("--respond and --no-respond contradict each other")
    if args.reflect and (nets > 1 or args.tap is not None):
        raise ConfigurationError("--reflect sends frames back to their own port; it needs "
                                 "exactly one --net and no --tap")
    respond = None if args.no_respond else (args.respond or "10.0.2.2")
    net = NetOptions(respond_ip=respond, pcap=args.pcap, tap=args.tap, reflect=args.reflect)
    return LaunchOptions(kernel=args.kernel, cmdline=" ".join(args.cmdline),
                         memory_mib=args.memory, initrd=args.initrd,
                         devices=list(args.devices), net=net, eventfds=not args.no_eventfd)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`vhostpy lguest`: launch the guest; exit status, or exec ourselves afresh when the
    guest restarts (as the 3.x Launcher does). A bad command line is one error line."""
    from vhostpy import lguest_launcher

    try:
        options = lguest_options(args)
        setup_logging(args.verbose)
        result = lguest_launcher.launch(options, opener=lguest_launcher.DEFAULT_OPENER)
    except ConfigurationError as exc:
        print(f"vhostpy lguest: error: {exc}", file=sys.stderr)
        return 1
    if result.exit.kind == "restart":   # like the 3.x Launcher: run ourselves afresh
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "vhostpy", *argv])
    return result.status
