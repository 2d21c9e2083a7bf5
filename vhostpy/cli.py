"""Command-line front doors, following QEMU's "Backend program conventions".

`vhostpy blk|net|rng --socket-path PATH | --fd N [options]` (and `vhostpy serve MODULE:CALLABLE
--socket-path PATH | --fd N`, which serves the `Device` that `CALLABLE()` returns) serves a
device until SIGTERM or SIGINT, then removes its socket, prints one JSON counters line on stderr
(`{"device": "blk", "event": "exit", "counters": {...}}`) and exits 0. SIGUSR1 prints the same
line (`"event": "SIGUSR1"`) and serving goes on; SIGHUP is logged (INFO) and ignored.
`--print-capabilities` prints the JSON capabilities and exits 0 (not for `serve`). A bad value
(for `serve`: a spec that cannot give a Device) is reported in one line on stderr
(`vhostpy COMMAND: error: ...`) with exit status 1, before anything listens; a bare `vhostpy`
lists the commands (exit 1). The process never daemonises.

`vhostpy lguest [options] KERNEL [KERNEL ARGS...]` is an lguest Launcher (see
vhostpy.lguest_launcher): it runs a guest on /dev/lguest with the console on stdin/stdout; its
command line lives in `cli_lguest`. `vhostpy ctl` talks to a device's `--control` socket
(`control`); `vhostpy replay` rebuilds a disk from a `--log-writes` log (`writelog`). The
parser and argument types every command shares are in `cliargs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vhostpy import __version__, cli_lguest
from vhostpy.api import Endpoint, load_device, serve_until_signalled
from vhostpy.blk import BlockDevice
from vhostpy.cliargs import (
    MAX_QUEUE_SIZE,
    Parser,
    fd_number,
    image_format,
    ipv4,
    not_negative,
    parse_size,
    positive_int,
    queue_size,
    setup_logging,
)
from vhostpy.control import ControlError, Controls, ControlServer, request
from vhostpy.ctlcommands import add_faults, add_power, add_status
from vhostpy.device import Device
from vhostpy.errors import ConfigurationError
from vhostpy.faults import BlockFault, FaultyStore
from vhostpy.loop import EventLoop
from vhostpy.rng import DEFAULT_MAX_BYTES_PER_REQUEST, RngDevice
from vhostpy.stores import FileStore, close_store
from vhostpy.writecache import DEFAULT_LIMIT, WriteCache
from vhostpy.writelog import LoggedStore

log = logging.getLogger("vhostpy")

DEFAULT_DISK_SIZE = 64 << 20
#: blk advertises seg_max = queue size - 2, so its rings hold at least 4 entries.
MIN_BLK_QUEUE_SIZE = 4
#: The commands and their one-line help, as a bare `vhostpy` lists them.
COMMANDS = {
    "blk": "a vhost-user virtio-blk back-end",
    "net": "a vhost-user virtio-net back-end",
    "rng": "a vhost-user virtio-rng back-end",
    "serve": "serve your own Device: vhostpy serve MODULE:CALLABLE",
    "lguest": "an lguest Launcher: run a guest kernel on /dev/lguest",
    "ctl": "send a command to a running device's --control socket",
    "replay": "rebuild a disk at a flush point of a --log-writes log",
}


def _add_transport_options(parser: argparse.ArgumentParser, *, several: bool = False,
                           capabilities: bool = True) -> None:
    """--socket-path | --fd (repeatable with `several`), --print-capabilities (unless
    `capabilities` is false), and the options every device command takes."""
    where = parser.add_mutually_exclusive_group()
    action = "append" if several else "store"
    more = " (repeat for several ports)" if several else ""
    where.add_argument("--socket-path", metavar="PATH", action=action,
                       help="listen for the vhost-user front-end on this UNIX socket" + more)
    where.add_argument("--fd", type=fd_number, metavar="N", action=action,
                       help="serve an inherited vhost-user socket (listening or connected)"
                       + more)
    if capabilities:
        parser.add_argument("--print-capabilities", action="store_true",
                            help="print the back-end's capabilities as JSON and exit")
    parser.add_argument("--control", metavar="PATH",
                        help="answer control commands on this UNIX socket (vhostpy ctl PATH "
                        "COMMAND: status, fault ..., power-cut ...)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v for connections, -vv for every message")


def build_parser() -> Parser:
    """The whole command line; `parser.commands` maps each command to its sub-parser."""
    parser = Parser(prog="vhostpy", description="virtio device back-ends in Python")
    parser.add_argument("--version", action="version", version=f"vhostpy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    blk = sub.add_parser("blk", help=COMMANDS["blk"],
                         description="Serve a raw image (or a RAM disk) as virtio-blk.")
    _add_transport_options(blk)
    blk.add_argument("--image", "--blk-file", dest="image", metavar="FILE",
                     help="raw image file or block device (default: an in-memory disk); "
                     "refused if it is in another format, empty or not whole 512-byte sectors, "
                     "or locked by QEMU, qemu-storage-daemon or another vhostpy")
    blk.add_argument("--format", dest="image_format", type=image_format, default=None,
                     metavar="raw", help="serve --image as raw even if it looks like another "
                     "format (qcow2, vmdk, ...); raw is the only value")
    blk.add_argument("--share-rw", action="store_true",
                     help="let other processes write --image while it is served (like QEMU's "
                     "share-rw=on; every user of the image must agree)")
    blk.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                     help="size of the in-memory disk when no --image is given (default 64M)")
    blk.add_argument("--read-only", action="store_true",
                     help="offer VIRTIO_BLK_F_RO; writes fail and the image is never changed")
    blk.add_argument("--serial", default="", metavar="STR",
                     help="serial number reported by GET_ID (at most 20 bytes)")
    blk.add_argument("--num-queues", type=positive_int, default=1, metavar="N",
                     help="request queues, 1..64 (VIRTIO_BLK_F_MQ above 1; default 1)")
    blk.add_argument("--queue-size", type=queue_size(MIN_BLK_QUEUE_SIZE), default=256,
                     metavar="N", help="largest ring size accepted (a power of two in "
                     f"{MIN_BLK_QUEUE_SIZE}..{MAX_QUEUE_SIZE}, default 256)")
    blk.add_argument("--no-coalesce", action="store_true",
                     help="interrupt the guest after every batch of requests, even while it "
                     "streams them (default: hold interrupts then, up to 0.5 ms)")
    blk.add_argument("--store", metavar="MODULE:CALLABLE",
                     help="serve the block store CALLABLE() returns (an object with size, "
                     "read, write, flush; methods may be async) instead of an image")
    blk.add_argument("--fault", dest="faults", action="append", metavar="SPEC",
                     help="fail or delay chosen requests on purpose (repeatable): "
                     "ioerr,op=read|write|flush|any,sectors=A-B[,after=N][,count=N] or "
                     "delay,ms=N|A-B[,op=...][,sectors=A-B]; 'none': no rule yet, but "
                     "ready for rules added with vhostpy ctl PATH fault add SPEC")
    blk.add_argument("--write-cache", action="store_true",
                     help="a volatile write-back cache: writes are durable only once the "
                     "guest flushes; vhostpy ctl PATH power-cut [torn] loses the rest")
    blk.add_argument("--write-cache-size", type=parse_size, default=None, metavar="SIZE",
                     help="--write-cache: what the cache holds before it writes its oldest "
                     "writes back early, as a full disk cache does (default 64M)")
    blk.add_argument("--log-writes", metavar="FILE",
                     help="append every write and flush, in order, to FILE (vhostpy replay "
                     "rebuilds the disk at any flush)")
    blk.add_argument("--nbd", metavar="URI",
                     help="serve a disk that lives on an NBD server: nbd://HOST[:PORT]/EXPORT "
                     "or nbd+unix:///EXPORT?socket=PATH")

    net = sub.add_parser("net", help=COMMANDS["net"],
                         description="Serve virtio-net ports; frames reach the built-in "
                         "responder, a pcap file, a tap device, a switch between the ports, "
                         "or are reflected.")
    _add_transport_options(net, several=True)
    net.add_argument("--num-queues", type=positive_int, default=1, metavar="N",
                     help="rx/tx queue pairs per port, 1..64 (default 1)")
    net.add_argument("--queue-size", type=queue_size(1), default=1024, metavar="N",
                     help=f"largest ring size accepted (a power of two in 1..{MAX_QUEUE_SIZE}, "
                     "default 1024)")
    net.add_argument("--respond", type=ipv4, default="10.0.2.2", metavar="IP",
                     help="the built-in responder answers ARP and ping for IP (default 10.0.2.2)")
    net.add_argument("--no-respond", action="store_true", help="turn the responder off")
    net.add_argument("--pcap", metavar="FILE",
                     help="record every frame in both directions to a pcap file")
    net.add_argument("--tap", metavar="IFNAME",
                     help="bridge the ports to a Linux tap device (needs CAP_NET_ADMIN)")
    net.add_argument("--reflect", action="store_true",
                     help="send every frame back to its port with the MAC addresses swapped")
    net.add_argument("--fault", dest="faults", action="append", metavar="SPEC",
                     help="drop, duplicate, reorder, corrupt or delay frames on purpose "
                     "(repeatable): drop|dup|corrupt[,p=P], reorder[,p=P][,depth=N] or "
                     "delay,ms=N|A-B[,p=P], each with optional dir=rx|tx (rx: toward the "
                     "guest), seed=N and filter=EXPR (tcpdump-like, e.g. 'filter=tcp and port "
                     "5000'); every port has a rule set, empty without --fault")

    rng = sub.add_parser("rng", help=COMMANDS["rng"],
                         description="Serve virtio-rng: each request is filled from "
                         "os.urandom (getrandom), which never blocks.")
    _add_transport_options(rng)
    rng.add_argument("--max-bytes-per-request", type=parse_size,
                     default=DEFAULT_MAX_BYTES_PER_REQUEST, metavar="SIZE",
                     help="fill at most SIZE bytes of one request; longer buffers are filled "
                     "partially (default 64K)")
    _add_serve_parser(sub)
    cli_lguest.add_parser(sub, COMMANDS["lguest"])
    _add_tool_parsers(sub)
    parser.commands = {name: p for name, p in sub.choices.items() if isinstance(p, Parser)}
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    serve_ = sub.add_parser(
        "serve", help=COMMANDS["serve"],
        description="Import MODULE (the current directory first on sys.path, as with "
        "python -m), call CALLABLE (a dotted attribute path is allowed, e.g. a Device "
        "subclass) with no arguments, and serve the vhostpy.device.Device it returns. At exit "
        "and on SIGUSR1 the counters line holds what the device's counters() method returns "
        "({} without one); the device's close() method, if any, is called at exit.")
    serve_.add_argument("spec", metavar="MODULE:CALLABLE",
                        help="where the device comes from, e.g. mymodule:make_device")
    _add_transport_options(serve_, capabilities=False)


def _add_tool_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    ctl = sub.add_parser(
        "ctl", help=COMMANDS["ctl"],
        description="Send COMMAND to the control socket of a device started with --control "
        "PATH and print the JSON answer (exit 1 with one line on an error). Commands: status; "
        "fault add SPEC | fault list | fault clear; power-cut [torn] (blk --write-cache); "
        "mark NAME (blk --log-writes); help.")
    ctl.add_argument("path", metavar="PATH", help="the device's --control socket")
    ctl.add_argument("ctl_command", metavar="COMMAND", help="status, fault, power-cut, mark, "
                     "help")
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER, metavar="ARG",
                     help="the command's arguments")
    replay = sub.add_parser(
        "replay", help=COMMANDS["replay"],
        description="Rebuild IMAGE, a copy of the disk as it was when vhostpy blk "
        "--log-writes LOG started, as it stood at a flush: the writes logged before it are "
        "applied, in order, to IMAGE in place (power cuts in the log are followed). Prints "
        "what was done as JSON.")
    replay.add_argument("log", metavar="LOG", help="the write log")
    replay.add_argument("image", metavar="IMAGE", nargs="?",
                        help="the raw image to rebuild (changed in place)")
    point = replay.add_mutually_exclusive_group()
    point.add_argument("--flush", type=not_negative("flush number"), metavar="N",
                       help="stop at the Nth flush (0: apply nothing; default: the last)")
    point.add_argument("--mark", metavar="NAME",
                       help="stop at the mark NAME (as of the last flush before it)")
    point.add_argument("--list", action="store_true",
                       help="print what the log holds (flush points, marks) and exit")


def _capabilities(command: str) -> dict[str, object]:
    if command == "blk":
        return {"type": "block", "features": ["read-only", "blk-file"]}
    if command == "net":
        return {"type": "net"}
    if command == "rng":
        return {"type": "rng"}   # VHostUserBackendType "rng" in QEMU's vhost-user.json
    raise AssertionError(command)


@dataclass
class _BlkParts:
    """The layers `vhostpy blk` put around its store (None where not asked for)."""

    faults: FaultyStore | None = None
    cache: WriteCache | None = None
    log: LoggedStore | None = None


def _make_blk(args: argparse.Namespace) -> tuple[BlockDevice, _BlkParts]:
    """The device and its store layers: the store, under a write cache (--write-cache),
    under the write log (--log-writes), under the fault rules (--fault)."""
    options = {"read_only": args.read_only, "serial": args.serial,
               "num_queues": args.num_queues, "queue_size": args.queue_size}
    specs = args.faults or []
    faults = [BlockFault.parse(spec) for spec in specs if spec != "none"]
    parts = _BlkParts()
    store: Any = _blk_store(args)
    try:
        if args.write_cache:
            store = parts.cache = WriteCache(store, limit=_cache_limit(args.write_cache_size))
        elif args.write_cache_size is not None:
            raise ConfigurationError("--write-cache-size is for --write-cache")
        if args.log_writes is not None:
            store = parts.log = LoggedStore(store, args.log_writes)
            if parts.cache is not None:
                parts.cache.on_write_back = parts.log.record_write_back
        if specs:
            store = parts.faults = FaultyStore(store, faults)
        device = BlockDevice(store, **options)
    except BaseException:
        close_store(store)
        raise
    if args.no_coalesce:
        device.coalesce = None
    return device, parts


def _cache_limit(size: int | None) -> int:
    """--write-cache-size, checked (DEFAULT_LIMIT when not given)."""
    if size is None:
        return DEFAULT_LIMIT
    if size < 4096:
        raise ConfigurationError(f"--write-cache-size must be at least 4K, not {size}")
    return size


def _blk_store(args: argparse.Namespace) -> object:
    """What `vhostpy blk` serves: --image, --store, --nbd or the in-memory disk."""
    sources = [name for name, given in (("--image", args.image), ("--store", args.store),
                                        ("--nbd", args.nbd)) if given is not None]
    if len(sources) > 1:
        raise ConfigurationError(f"{sources[0]} and {sources[1]} both say what to serve; "
                                 "give one")
    if args.store is not None or args.nbd is not None:
        for given, name in ((args.size, "--size"), (args.image_format, "--format"),
                            (args.share_rw or None, "--share-rw")):
            if given is not None:
                raise ConfigurationError(f"{name} is for images and the in-memory disk, "
                                         f"not for {sources[0]}")
        return _make_store(args)
    if args.image is not None:
        if args.size is not None:
            raise ConfigurationError("--size is for the in-memory disk; it cannot be "
                                     "combined with --image")
        return FileStore.open(args.image, read_only=args.read_only,
                              image_format=args.image_format, share_rw=args.share_rw)
    for given, name in ((args.image_format, "--format"), (args.share_rw, "--share-rw")):
        if given:
            raise ConfigurationError(f"{name} is for --image; the in-memory disk is "
                                     "always raw and never shared")
    size = DEFAULT_DISK_SIZE if args.size is None else args.size  # --size 0 is an error
    return FileStore.in_memory(size)


def _make_store(args: argparse.Namespace) -> object:
    """The store of `--store MODULE:CALLABLE` or `--nbd URI` (ConfigurationError if bad)."""
    if args.nbd is not None:
        from vhostpy.nbd import NbdStore
        return NbdStore.connect(args.nbd)
    from vhostpy.api import load_callable
    return load_callable(args.store)


def counters_line(device: str, counters: dict[str, Any], event: str = "exit") -> str:
    """The one JSON line every device command prints at exit (`event` "exit") and on
    SIGUSR1 (`event` "SIGUSR1"): {"device": ..., "event": ..., "counters": {...}}."""
    # Written by hand so the line reads device, event, counters (keys sorted inside counters).
    return (f'{{"device": {json.dumps(device)}, "event": {json.dumps(event)}, '
            f'"counters": {json.dumps(counters, sort_keys=True)}}}')


def parse_counters_lines(text: str) -> list[dict[str, Any]]:
    """Every counters line (see `counters_line`) found in `text`, e.g. a back-end's stderr,
    as dictionaries, in order; other lines are skipped."""
    found: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and {"device", "event", "counters"} <= set(record):
                found.append(record)
    return found


def _print_counters(device: str, counters: Callable[[], dict[str, Any]], event: str) -> None:
    print(counters_line(device, counters(), event), file=sys.stderr, flush=True)


def _info_signals(device: str, counters: Callable[[], dict[str, Any]]
                  ) -> dict[int, Callable[[], None]]:
    """The signals every device command answers without stopping: SIGUSR1 prints the
    counters line and goes on; SIGHUP is logged and ignored."""
    return {signal.SIGUSR1: lambda: _print_counters(device, counters, "SIGUSR1"),
            signal.SIGHUP: lambda: log.info("SIGHUP: nothing to reload; still serving")}


def _handle_signals(loop: EventLoop, device: str,
                    counters: Callable[[], dict[str, Any]]) -> None:
    """SIGTERM/SIGINT stop `loop`, plus `_info_signals`. Installed before anything listens,
    so no signal can leave a socket file behind."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    for number, handler in _info_signals(device, counters).items():
        loop.add_signal_handler(number, handler)


def serve(device: Device, *, socket_path: str | None, fd: int | None,
          counters: Callable[[], dict[str, Any]] | None = None, command: str = "",
          details: str = "", control_path: str | None = None,
          controls: Controls | None = None) -> int:
    """Serve `device` until SIGTERM/SIGINT (`vhostpy.serve`); returns the exit status.

    With `counters`, SIGUSR1 prints `counters_line(command, counters())` and serving goes
    on; the caller prints the exit line. `details` ends the `-v` "serving" line. With
    `control_path` (--control), a control socket answers `controls` (the device's commands)
    plus `status`: made first, so a bad path fails before anything listens, answering once
    the device's socket listens, closed when serving ends."""
    name = command or device.name
    counters = counters or dict
    control = None if control_path is None else \
        ControlServer(control_path, controls or Controls())

    def serving(endpoint: Endpoint) -> None:
        log.info("serving %s on %s%s", device.name,
                 socket_path if socket_path is not None else f"fd {fd}",
                 f": {details}" if details else "")
        if control is not None:
            add_status(control.controls, name, lambda: [endpoint.status()], counters)
            control.start(endpoint.call_soon_threadsafe)
    try:
        # The signal handlers are in place before the socket listens (vhostpy.serve's promise).
        endpoint = serve_until_signalled(
            device, socket_path=socket_path, fd=fd,
            signals=_info_signals(name, counters), serving=serving)
    finally:
        if control is not None:
            control.close()
    log.info("stopped after %d front-end connection(s)", endpoint.connections_served)
    return 0


def _human_size(size: int) -> str:
    """4096 -> '4 KiB', 1572864 -> '1.5 MiB', 100 -> '100 bytes'."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g} {unit}"
    return f"{size} bytes"


def _list_commands(parser: Parser) -> int:
    lines = ["vhostpy: error: a command is required:"]
    lines += [f"  {name:<7} {help_}" for name, help_ in COMMANDS.items()]
    lines.append("(vhostpy COMMAND --help for its options)")
    print("\n".join(lines), file=sys.stderr)
    return 1


def _keep_negative_values(parser: Parser, argv: list[str]) -> list[str]:
    """`--size -1M` as `--size=-1M`: argparse would take `-1M` for an option and say only
    "expected one argument"; joined, the value reaches its check and is explained."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = parser.commands.get(command or "")
    if sub is None or command == "lguest":
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg in sub.value_options and i + 1 < len(argv)
                and re.match(r"^-\d", argv[i + 1])):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(_keep_negative_values(parser, raw))
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _list_commands(parser)
    prog = f"vhostpy {args.command}"
    if extra:
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 1
    if args.command == "lguest":
        return cli_lguest.run(args, raw)
    if args.command in ("ctl", "replay"):
        try:
            return _run_ctl(args) if args.command == "ctl" else _run_replay(args)
        except (ConfigurationError, ControlError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
    if args.command != "serve" and args.print_capabilities:
        print(json.dumps(_capabilities(args.command)))
        return 0
    if not args.socket_path and args.fd is None:
        print(f"{prog}: error: one of --socket-path or --fd is required", file=sys.stderr)
        return 1
    setup_logging(args.verbose)
    try:
        if args.command == "net":
            return _run_net(args)
        if args.command == "rng":
            return _run_rng(args)
        if args.command == "serve":
            return _run_serve(args)
        return _run_blk(args)
    except ConfigurationError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def _run_ctl(args: argparse.Namespace) -> int:
    result = request(args.path, args.ctl_command, args.ctl_args)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _run_replay(args: argparse.Namespace) -> int:
    from vhostpy.writelog import LogReader, replay
    if args.list:
        if args.image is not None:
            raise ConfigurationError("--list reads only the log: give no IMAGE")
        reader = LogReader(args.log)
        try:
            print(json.dumps(reader.summary(), indent=2))
        finally:
            reader.close()
        return 0
    if args.image is None:
        raise ConfigurationError("give the IMAGE to rebuild (a copy of the disk as it was "
                                 "when the log began)")
    print(json.dumps(replay(args.log, args.image, flush=args.flush, mark=args.mark),
                     indent=2))
    return 0


def _run_blk(args: argparse.Namespace) -> int:
    device, parts = _make_blk(args)

    def counters() -> dict[str, Any]:
        found: dict[str, Any] = asdict(device.stats)
        for name, layer in (("faults", parts.faults), ("write_cache", parts.cache),
                            ("write_log", parts.log)):
            if layer is not None:
                found[name] = layer.counters()
        return found
    try:
        controls = Controls()
        add_faults(controls, parts.faults, BlockFault.parse,
                   "this vhostpy blk takes no fault rules: start it with --fault SPEC (or "
                   "--fault none) to add them at run time")
        add_power(controls, parts.cache, parts.log)
        details = (f"{_human_size(device.size_bytes)} ({device.capacity} sectors), "
                   f"{'read-only' if device.read_only else 'read-write'}, "
                   f"{device.num_queues} queue(s) of up to {device.max_queue_size}")
        status = serve(device, socket_path=args.socket_path, fd=args.fd, counters=counters,
                       command="blk", details=details, control_path=args.control,
                       controls=controls)
        _print_counters("blk", counters, "exit")   # only once it has served
        return status
    finally:
        device.close()


def _run_rng(args: argparse.Namespace) -> int:
    device = RngDevice(max_bytes_per_request=args.max_bytes_per_request)
    status = serve(device, socket_path=args.socket_path, fd=args.fd,
                   counters=device.counters, command="rng", control_path=args.control,
                   details=f"at most {args.max_bytes_per_request} bytes per request")
    _print_counters("rng", device.counters, "exit")
    return status


def _run_serve(args: argparse.Namespace) -> int:
    device = load_device(args.spec)
    counters = _device_counters(device)
    try:
        status = serve(device, socket_path=args.socket_path, fd=args.fd, counters=counters,
                       details=f"{device.num_queues} queue(s), from {args.spec}",
                       control_path=args.control)
        _print_counters(device.name, counters, "exit")   # only once it has served
        return status
    finally:
        close = getattr(device, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("%s: close() failed", device.name)


def _device_counters(device: Device) -> Callable[[], dict[str, Any]]:
    """What a user's device reports in the counters line: its `counters()` (made
    JSON-safe), {} without one, {} and a warning when it fails."""
    method = getattr(device, "counters", None)
    if not callable(method):
        return dict

    def counters() -> dict[str, Any]:
        try:
            value = method()
            if not isinstance(value, dict):
                raise TypeError(f"it returned {type(value).__name__}, not a dict")
            safe: dict[str, Any] = json.loads(json.dumps(value, default=str))
        except Exception as exc:   # noqa: BLE001 (a user's method: whatever it raises)
            log.warning("%s: counters() failed: %r", device.name, exc)
            return {}
        return safe
    return counters


def _run_net(args: argparse.Namespace) -> int:
    from vhostpy.netapp import NetApp
    from vhostpy.netfaults import NetFault

    faults = [NetFault.parse(spec) for spec in args.faults or () if spec != "none"]

    places = _distinct("--socket-path", args.socket_path or []) + \
        _distinct("--fd", args.fd or [])
    loop = EventLoop()
    app: NetApp | None = None

    def counters() -> dict[str, Any]:
        return app.counters() if app is not None else {}
    _handle_signals(loop, "net", counters)   # before any socket exists
    control: ControlServer | None = None
    try:
        if args.control is not None:    # before any socket: a bad path fails first
            control = ControlServer(args.control, Controls())
        app = NetApp(socket_paths=args.socket_path or (), fds=args.fd or (),
                     num_queues=args.num_queues, queue_size=args.queue_size,
                     respond_ip=None if args.no_respond else args.respond, pcap=args.pcap,
                     tap=args.tap, reflect=args.reflect, faults=faults, loop=loop)
    except BaseException:
        if control is not None:
            control.close()
        loop.close()
        raise
    if control is not None:
        servers = list(app.servers)
        add_status(control.controls, "net",
                   lambda: [{"device": s.device.name, **s.status()} for s in servers],
                   counters)
        add_faults(control.controls, app.faults, NetFault.parse)
        control.start(loop.call_soon_threadsafe)
    log.info("serving virtio-net on %s: %d port(s), %d queue pair(s) per port, rings of up "
             "to %d", ", ".join(places), len(places), args.num_queues, args.queue_size)
    try:
        app.run()
    finally:
        if control is not None:
            control.close()
        final = app.counters()
        app.close()
        _print_counters("net", lambda: final, "exit")
    return 0


def _distinct(option: str, values: Sequence[str | int]) -> list[str]:
    """`values` of a repeatable option as display names; ConfigurationError if one is given
    twice (two ports cannot share one socket)."""
    seen: dict[str, str] = {}
    for value in values:
        key = os.path.abspath(value) if isinstance(value, str) else str(value)
        if key in seen:
            raise ConfigurationError(f"{option} {value} was given twice: each port needs "
                                     "its own socket")
        seen[key] = str(value) if isinstance(value, str) else f"fd {value}"
    return list(seen.values())
