"""virtio-console with a single port (virtio 1.2, section 5.3), MULTIPORT not offered.

`ConsoleDevice` has two queues: receiveq (0, host to guest) and transmitq (1, guest to host).
What the guest writes on the transmitq goes, in order and byte for byte, to an output sink:
a callable `on_output(data)`, or by default an `FdOutput` writing to a file descriptor
(stdout unless another fd is given). Host input passed to `feed(data)` waits in a bounded
buffer and is written into the driver's receive buffers, in order, as they arrive; what does
not fit in the buffer is dropped and counted. Nothing here ever blocks: `FdOutput` keeps what
a non-blocking fd refuses in its own bounded backlog.

Config space: cols u16, rows u16, max_nr_ports u32, emerg_wr u32. VIRTIO_CONSOLE_F_SIZE is
offered only when the device is given a size (it is then fixed: resizing would need a config
interrupt, which the `Device` interface does not have), VIRTIO_CONSOLE_F_EMERG_WRITE by
default: a driver write to emerg_wr sends its low byte to the sink.

Everything runs on the thread that runs the device's transport (`feed` too). This module
never imports the transports (vhost-user session, server, event loop): attaching a console to
a terminal or a socket is the launcher's business, with `feed` and `FdOutput.flush`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vhostpy.device import VIRTIO_ID_CONSOLE, Device, batches
from vhostpy.errors import ConfigurationError
from vhostpy.virtqueue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

# Feature bits (5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ = 0    # port 0 receive: the device writes host input into driver buffers
TRANSMITQ = 1   # port 0 transmit: the driver's output

#: struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

DEFAULT_INPUT_LIMIT = 64 * 1024    # host input waiting for receive buffers
DEFAULT_OUTPUT_LIMIT = 64 * 1024   # FdOutput backlog when its fd is not writable
#: Bytes of one transmit chain passed on at most; a hostile guest cannot make us copy GiBs.
MAX_OUTPUT_PER_CHAIN = 1 << 20
#: Guest output gathered before one sink call (several small chains make one call).
OUTPUT_BATCH_BYTES = 256 * 1024
DEFAULT_QUEUE_SIZE = 256

OutputSink = Callable[[bytes], None]


@dataclass
class ConsoleStats:
    """Counters of one `ConsoleDevice`; "output" is guest to host, "input" host to guest."""

    output_chains: int = 0      # transmitq chains served
    output_bytes: int = 0       # bytes the guest wrote and the sink was given
    output_truncated: int = 0   # bytes beyond MAX_OUTPUT_PER_CHAIN, not passed on
    output_errors: int = 0      # sink calls that raised
    emerg_bytes: int = 0        # characters written through emerg_wr
    input_bytes: int = 0        # bytes written into receive buffers
    input_chains: int = 0       # receive buffers used
    input_dropped: int = 0      # bytes fed while the input buffer was full


class FdOutput:
    """An output sink writing to `fd` that never blocks on a non-blocking fd.

    Bytes the fd does not take at once (EAGAIN, a short write) wait in a backlog of at most
    `limit` bytes; later output beyond that is dropped and counted in `dropped`. The backlog
    is retried on each write and by `flush()`, which the owner of an event loop calls when
    the fd becomes writable (`pending` says whether it needs to). With `nonblocking=True` the
    fd is switched to O_NONBLOCK; that flag is shared by every process using the same open
    file (a terminal), so it is off by default and a blocking fd may block the writer.
    A write error other than EAGAIN (EPIPE, EIO) discards the backlog and counts in `errors`.
    """

    def __init__(self, fd: int, *, limit: int = DEFAULT_OUTPUT_LIMIT,
                 nonblocking: bool = False) -> None:
        if limit < 0:
            raise ConfigurationError(f"output limit must not be negative, not {limit}")
        self.fd = fd
        self.limit = limit
        self.dropped = 0
        self.errors = 0
        self.written = 0
        self._backlog = bytearray()
        if nonblocking:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    @property
    def pending(self) -> int:
        """Bytes waiting for the fd to become writable."""
        return len(self._backlog)

    def __call__(self, data: bytes) -> None:
        if self._backlog and not self.flush():
            self._queue(data)   # keep the order: nothing may overtake the backlog
            return
        written = self._write(data)
        if written is None:
            self.dropped += len(data)
        elif written < len(data):
            self._queue(data[written:])

    def flush(self) -> bool:
        """Write as much of the backlog as the fd takes; True when nothing is left."""
        if self._backlog:
            written = self._write(bytes(self._backlog))
            if written is None:
                self.dropped += len(self._backlog)
                self._backlog.clear()
            else:
                del self._backlog[:written]
        return not self._backlog

    def _queue(self, data: bytes) -> None:
        room = max(self.limit - len(self._backlog), 0)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._backlog += data

    def _write(self, data: bytes) -> int | None:
        """Write until the fd would block; the bytes written, or None after an error."""
        done = 0
        while done < len(data):
            try:
                n = os.write(self.fd, data[done:] if done else data)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                self.errors += 1
                if self.errors == 1 or exc.errno != errno.EPIPE:
                    log.warning("console output fd %d: %s; output dropped", self.fd,
                                exc.strerror)
                return None
            if n <= 0:
                break
            done += n
        self.written += done
        return done


class ConsoleDevice(Device):
    """A one-port virtio-console: guest output to `on_output`, host input by `feed()`."""

    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"
    num_queues = 2

    def __init__(self, *, on_output: OutputSink | None = None, output_fd: int | None = None,
                 input_limit: int = DEFAULT_INPUT_LIMIT, size: tuple[int, int] | None = None,
                 emerg_write: bool = True, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__()
        if on_output is not None and output_fd is not None:
            raise ConfigurationError("give a console either on_output or output_fd, not both")
        if input_limit < 0:
            raise ConfigurationError(f"input limit must not be negative, not {input_limit}")
        if size is not None and not all(0 <= v <= 0xFFFF for v in size):
            raise ConfigurationError(f"console size (cols, rows) must be 16-bit values, "
                                     f"not {size}")
        if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ConfigurationError(f"queue size must be a power of two in "
                                     f"1..{MAX_QUEUE_SIZE}, not {queue_size}")
        #: The default sink (None when the caller gave `on_output`).
        self.output: FdOutput | None = None
        if on_output is None:
            self.output = FdOutput(1 if output_fd is None else output_fd)
            on_output = self.output
        self.on_output: OutputSink = on_output
        self.input_limit = input_limit
        self.size = size
        self.emerg_write = emerg_write
        self.max_queue_size = queue_size
        self.stats = ConsoleStats()
        self._input = bytearray()
        self._rx: Virtqueue | None = None

    # -- negotiation and config ------------------------------------------------------------
    def device_features(self) -> int:
        bits = 0
        if self.size is not None:
            bits |= 1 << VIRTIO_CONSOLE_F_SIZE
        if self.emerg_write:
            bits |= 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        return bits

    def config(self) -> bytes:
        cols, rows = self.size if self.size is not None else (0, 0)
        return CONFIG.pack(cols, rows, 1, 0)   # one port; emerg_wr reads as 0

    def write_config(self, offset: int, data: bytes) -> None:
        """Only emerg_wr is writable (when EMERG_WRITE is offered; 5.3.4: even unacked)."""
        end = offset + len(data)
        if not self.emerg_write or offset < EMERG_WR_OFFSET or end > CONFIG.size:
            super().write_config(offset, data)
        if offset == EMERG_WR_OFFSET and data:
            # The character is the low byte of the little-endian u32.
            self.stats.emerg_bytes += 1
            self._emit(bytes(data[:1]))

    def reset(self) -> None:
        """Forget the rings; host input still buffered stays for the next driver."""
        super().reset()
        self._rx = None

    # -- queues ----------------------------------------------------------------------------
    def queue_started(self, index: int, vq: Virtqueue) -> None:
        if index == RECEIVEQ:
            self._rx = vq
        self.process_queue(index, vq)

    def queue_stopped(self, index: int, vq: Virtqueue) -> None:
        if index == RECEIVEQ and self._rx is vq:
            self._rx = None

    def process_queue(self, index: int, vq: Virtqueue) -> None:
        if index == TRANSMITQ:
            self._drain_output(vq)
        elif index == RECEIVEQ:
            self._flush_input()

    # -- guest -> host ---------------------------------------------------------------------
    def _drain_output(self, vq: Virtqueue) -> None:
        stats = self.stats
        for chains in batches(vq):
            parts: list[bytes] = []
            gathered = 0
            for chain in chains:
                data = self._output_of(chain)
                stats.output_chains += 1
                if data:
                    parts.append(data)
                    gathered += len(data)
                if gathered >= OUTPUT_BATCH_BYTES:
                    self._emit_output(parts)
                    parts, gathered = [], 0
            vq.add_used_many([(chain.head, 0) for chain in chains])
            vq.signal_used()
            self._emit_output(parts)

    def _output_of(self, chain: DescriptorChain) -> bytes:
        length = chain.readable_len
        if length > MAX_OUTPUT_PER_CHAIN:
            self.stats.output_truncated += length - MAX_OUTPUT_PER_CHAIN
            log.warning("virtio-console: transmit chain %d of %d bytes; only the first %d "
                        "passed on", chain.head, length, MAX_OUTPUT_PER_CHAIN)
            length = MAX_OUTPUT_PER_CHAIN
        return chain.read(0, length) if length else b""

    def _emit_output(self, parts: list[bytes]) -> None:
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self.stats.output_bytes += len(data)
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        try:
            self.on_output(data)
        except Exception:  # user code cannot break a ring
            self.stats.output_errors += 1
            log.exception("virtio-console: output sink %r failed", self.on_output)

    # -- host -> guest ---------------------------------------------------------------------
    @property
    def pending_input(self) -> int:
        """Bytes fed and not yet in a receive buffer."""
        return len(self._input)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Queue host input for the guest; returns the bytes accepted (the rest is dropped).

        Never blocks: input goes into the driver's receive buffers now if there are any,
        else waits (up to `input_limit` bytes) for the next ones.
        """
        if self._input:
            self._flush_input()   # buffers may have arrived without a kick
        data = bytes(data)
        room = max(self.input_limit - len(self._input), 0)
        if len(data) > room:
            self.stats.input_dropped += len(data) - room
            log.debug("virtio-console: input buffer full; %d bytes dropped", len(data) - room)
            data = data[:room]
        self._input += data
        self._flush_input()
        return len(data)

    def discard_input(self) -> int:
        """Drop host input not yet delivered (not counted as dropped); returns its length."""
        n = len(self._input)
        self._input.clear()
        return n

    def _flush_input(self) -> None:
        """Move buffered input into receive buffers until either runs out."""
        vq = self._rx
        if vq is None or not self._input:
            return
        stats = self.stats
        used: list[tuple[int, int]] = []
        while self._input and vq.ready:
            chain = vq.pop()
            if chain is None:
                break
            # A bytearray slice is a copy, so deleting from the buffer afterwards is safe.
            n = chain.write(self._input[: chain.writable_len]) if chain.writable_len else 0
            del self._input[:n]
            used.append((chain.head, n))
            stats.input_chains += 1
            stats.input_bytes += n
        if used:
            vq.add_used_many(used)
            vq.signal_used()

    def counters(self) -> dict[str, int]:
        """The counters, plus the input still waiting, as a plain dictionary."""
        out = dict(vars(self.stats))
        out["input_pending"] = len(self._input)
        if self.output is not None:
            out["output_pending"] = self.output.pending
            out["output_dropped"] = self.output.dropped
        return out
