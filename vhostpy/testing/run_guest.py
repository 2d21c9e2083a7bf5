"""``python -m vhostpy.testing.run_guest`` (``ci/qemu/run-guest.sh``): boot a throw-away
guest against vhost-user sockets from a shell, stream its console, exit with the script's
status (124 timeout, 125 QEMU or guest failure, 2 missing kernel or QEMU).

For humans and scripts; tests use `vhostpy.testing.guest` or the plugin. Stdlib only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vhostpy.testing.errors import GuestError, GuestImageError, GuestTimeout
from vhostpy.testing.guest import start_guest

__all__ = ["main"]


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="run-guest.sh",
        description="Boot a throw-away QEMU guest against vhost-user sockets.",
        epilog="Arguments after -- go to QEMU verbatim.",
    )
    ap.add_argument("--blk", action="append", default=[], metavar="SOCK",
                    help="vhost-user-blk socket (repeatable; /dev/vda, /dev/vdb, ...)")
    ap.add_argument("--net", action="append", default=[], metavar="SOCK",
                    help="vhost-user net socket (repeatable; eth0, eth1, ...)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--script", type=Path, help="shell script to run in the guest")
    src.add_argument("--command", help="shell commands to run in the guest")
    ap.add_argument("--blk-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra vhost-user-blk-pci property, e.g. num-queues=2")
    ap.add_argument("--net-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra virtio-net-pci property, e.g. host_mtu=9000")
    ap.add_argument("--netdev-opt", action="append", type=_kv, default=[], metavar="K=V",
                    help="extra -netdev vhost-user property, e.g. queues=2")
    ap.add_argument("--memory", type=int, default=256, metavar="MB")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--accel", default=None, help="tcg or kvm (default: detect)")
    ap.add_argument("--append", default="", help="extra kernel command line")
    ap.add_argument("--quiet", "-q", action="store_true",
                    help="print only the script's output (after the guest ends)")
    ap.add_argument("--print-command", action="store_true", help="print the QEMU argv first")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Boot a guest from the command line, stream its console, exit with the script's status."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    qemu_extra: list[str] = []
    if "--" in raw_argv:
        i = raw_argv.index("--")
        raw_argv, qemu_extra = raw_argv[:i], raw_argv[i + 1:]
    args = _parser().parse_args(raw_argv)
    try:
        script = args.script.read_text() if args.script else args.command + "\n"
    except OSError as e:
        print(f"run-guest: cannot read {args.script}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        guest = start_guest(
            script, blk_sockets=args.blk, net_sockets=args.net,
            blk_options=dict(args.blk_opt), net_options=dict(args.net_opt),
            netdev_options=dict(args.netdev_opt), memory_mb=args.memory, timeout=args.timeout,
            extra_args=qemu_extra, append=args.append, accel=args.accel,
        )
    except GuestImageError as e:
        print(f"run-guest: {e}", file=sys.stderr)
        return 2
    with guest:
        if args.print_command:
            print(shlex.join(guest.argv), file=sys.stderr)
        printed = 0
        try:
            while not args.quiet and guest.is_running():
                text = guest.console_so_far()
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
                time.sleep(0.1)
            result = guest.wait()
        except GuestError as e:
            if not args.quiet:
                sys.stdout.write(guest.console_so_far()[printed:])
            print(f"\nrun-guest: {e}", file=sys.stderr)
            return 124 if isinstance(e, GuestTimeout) else 125
        if args.quiet:
            sys.stdout.write(result.console)
        else:
            sys.stdout.write(result.raw_console[printed:])
        sys.stdout.flush()
        print(f"run-guest: [{guest.accel}] guest exited {result.exit_code} "
              f"after {result.duration:.1f} s", file=sys.stderr)
        return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
