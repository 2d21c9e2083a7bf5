"""Booting an lguest guest: the kernel image, the initrd and the zero page, as bytes in memory.

This module owns what the 3.x lguest Launcher (tools/lguest/lguest.c) did before it opened
/dev/lguest, as pure functions over bytes and a `GuestMemory`:

* a `vmlinux` (ELF32 or ELF64, ET_EXEC, x86): every PT_LOAD segment copied to its *physical*
  address (p_paddr; the guest maps itself to the virtual one), the tail up to p_memsz zeroed;
  the entry point is e_entry. (lguest only ever ran i386 guests; ELF64 is parsed so that a
  wrong kernel is diagnosed precisely rather than loaded as garbage.)
* a `bzImage`: the setup header must carry "HdrS"; the protected-mode part, which starts after
  (setup_sects or 4) + 1 sectors of the file, is loaded at 1 MiB and entered at code32_start.
* an initrd: placed at the top of guest RAM, its length rounded up to a page (the Launcher
  reported that rounded length as ramdisk_size; so do we).
* `struct boot_params` at guest-physical 0 (arch/x86/include/uapi/asm/bootparam.h offsets):
  one e820 RAM entry covering exactly guest RAM (the device page sits just above it, outside
  the map), the command line in the page after it with cmd_line_ptr, hardware_subarch =
  X86_SUBARCH_LGUEST, boot protocol version 2.07, KEEP_SEGMENTS in loadflags,
  kernel_alignment 16 MiB, and ramdisk_image / ramdisk_size / type_of_loader 0xFF with an
  initrd. Everything else in the page stays zero, as in the Launcher's zeroed memory.

It must never open files, devices or sockets, and never import the transports: callers hand
it bytes. Host mistakes (a truncated or foreign kernel, a kernel or initrd that does not fit
in RAM, a command line too long) raise `ConfigurationError` naming the offending values;
nothing is written to guest memory before the whole image has been checked.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from .errors import ConfigurationError
from .memory import GuestMemory

__all__ = [
    "BOOT_PARAMS_SIZE", "BZIMAGE_LOAD_ADDRESS", "CMDLINE_ADDRESS", "COMMAND_LINE_SIZE",
    "E820_RAM", "KEEP_SEGMENTS", "LGUEST_BOOT_PROTOCOL", "LGUEST_KERNEL_ALIGNMENT",
    "X86_SUBARCH_LGUEST", "BootLayout", "KernelImage", "Segment", "boot_params",
    "command_line", "load_kernel", "parse_kernel", "place_initrd", "prepare_boot",
    "write_boot_params",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
SECTOR = 512

# struct boot_params (the "zero page") and struct setup_header at 0x1f1.
BOOT_PARAMS_SIZE = 4096
OFF_E820_ENTRIES = 0x1E8          # u8
OFF_SETUP_SECTS = 0x1F1           # u8
OFF_HEADER = 0x202                # u32 "HdrS"
OFF_VERSION = 0x206               # u16
OFF_TYPE_OF_LOADER = 0x210        # u8
OFF_LOADFLAGS = 0x211             # u8
OFF_CODE32_START = 0x214          # u32
OFF_RAMDISK_IMAGE = 0x218         # u32
OFF_RAMDISK_SIZE = 0x21C          # u32
OFF_CMD_LINE_PTR = 0x228          # u32
OFF_KERNEL_ALIGNMENT = 0x230      # u32
OFF_HARDWARE_SUBARCH = 0x23C      # u32
OFF_E820_MAP = 0x2D0              # struct e820entry {u64 addr; u64 size; u32 type} [128]
E820_ENTRY = struct.Struct("<QQI")

HDRS_MAGIC = b"HdrS"
E820_RAM = 1
KEEP_SEGMENTS = 1 << 6            # loadflags: do not reload segment registers
X86_SUBARCH_LGUEST = 1
LGUEST_BOOT_PROTOCOL = 0x0207     # 2.07: the first with hardware_subarch
LGUEST_KERNEL_ALIGNMENT = 0x1000000
LOADER_UNKNOWN = 0xFF
#: The command line lives in the page after the zero page (the Launcher's `boot + 1`).
CMDLINE_ADDRESS = BOOT_PARAMS_SIZE
#: x86's COMMAND_LINE_SIZE in 3.x kernels (bytes including the NUL).
COMMAND_LINE_SIZE = 2048
#: Modern bzImages are loaded at 1 MiB.
BZIMAGE_LOAD_ADDRESS = 0x100000
#: Lowest address a kernel segment or initrd may use: above the zero page and command line.
LOW_RESERVED = CMDLINE_ADDRESS + PAGE_SIZE

# ELF (include/uapi/linux/elf.h).
ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")      # type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR64 = struct.Struct("<IIQQQQQQ")      # type, flags, offset, vaddr, paddr, filesz, memsz, align


@dataclass(frozen=True)
class Segment:
    """Bytes `data` to put at guest-physical `address`, followed by `zero` zero bytes."""

    address: int
    data: bytes | memoryview
    zero: int = 0

    @property
    def end(self) -> int:
        return self.address + len(self.data) + self.zero


@dataclass(frozen=True)
class KernelImage:
    """A parsed kernel: its format ("elf32", "elf64" or "bzImage"), entry and segments."""

    kind: str
    entry: int
    segments: tuple[Segment, ...]
    protocol: int = 0       # bzImage: the boot protocol version its header declares

    @property
    def end(self) -> int:
        """One past the highest guest-physical byte the kernel occupies."""
        return max(s.end for s in self.segments)

    @property
    def start(self) -> int:
        return min(s.address for s in self.segments)


@dataclass(frozen=True)
class BootLayout:
    """Where everything went: the entry point and the initrd (0, 0 without one)."""

    entry: int
    kernel: KernelImage
    initrd_address: int = 0
    initrd_size: int = 0


def parse_kernel(data: bytes | memoryview) -> KernelImage:
    """A vmlinux (ELF) or a bzImage, told apart by the ELF magic like the Launcher did."""
    view = memoryview(data).cast("B")
    if bytes(view[:4]) == ELFMAG:
        return _parse_elf(view)
    return _parse_bzimage(view)


def _parse_elf(view: memoryview) -> KernelImage:
    if len(view) < 16:
        raise ConfigurationError(f"kernel: ELF file of {len(view)} bytes has no ELF header")
    elf_class, encoding = view[4], view[5]
    if encoding != ELFDATA2LSB:
        raise ConfigurationError(f"kernel: ELF data encoding {encoding} is not little-endian")
    if elf_class == ELFCLASS32:
        ehdr, phdr, kind = _EHDR32, _PHDR32, "elf32"
    elif elf_class == ELFCLASS64:
        ehdr, phdr, kind = _EHDR64, _PHDR64, "elf64"
    else:
        raise ConfigurationError(f"kernel: unknown ELF class {elf_class}")
    if len(view) < ehdr.size:
        raise ConfigurationError(f"kernel: {kind} header truncated ({len(view)} bytes)")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum,
     _, _, _) = ehdr.unpack_from(view)
    if e_type != ET_EXEC or e_machine not in (EM_386, EM_X86_64):
        raise ConfigurationError(f"kernel: ELF type {e_type} machine {e_machine} is not an x86 "
                                 f"executable (want type {ET_EXEC}, machine {EM_386} or "
                                 f"{EM_X86_64})")
    if e_phentsize != phdr.size or not 1 <= e_phnum <= 65536 // phdr.size:
        raise ConfigurationError(f"kernel: malformed ELF program headers (entry size "
                                 f"{e_phentsize}, count {e_phnum})")
    if e_phoff + e_phnum * phdr.size > len(view):
        raise ConfigurationError(f"kernel: program headers at {e_phoff:#x} run past the end of "
                                 f"the {len(view)}-byte file")
    segments = []
    for i in range(e_phnum):
        fields = phdr.unpack_from(view, e_phoff + i * phdr.size)
        if kind == "elf32":
            p_type, p_offset, _, p_paddr, p_filesz, p_memsz, _, _ = fields
        else:
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = fields
        if p_type != PT_LOAD:
            continue
        if p_offset + p_filesz > len(view):
            raise ConfigurationError(f"kernel: segment {i} ({p_filesz:#x} bytes at file offset "
                                     f"{p_offset:#x}) runs past the end of the file")
        if p_memsz < p_filesz:
            raise ConfigurationError(f"kernel: segment {i} has memsz {p_memsz:#x} below "
                                     f"filesz {p_filesz:#x}")
        segments.append(Segment(p_paddr, view[p_offset:p_offset + p_filesz],
                                p_memsz - p_filesz))
    if not segments:
        raise ConfigurationError("kernel: the ELF file has no PT_LOAD segment")
    return KernelImage(kind, e_entry, tuple(segments))


def _parse_bzimage(view: memoryview) -> KernelImage:
    if len(view) < OFF_CODE32_START + 4 or bytes(view[OFF_HEADER:OFF_HEADER + 4]) != HDRS_MAGIC:
        raise ConfigurationError("kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" "
                                 "setup header at 0x202)")
    setup_sects = view[OFF_SETUP_SECTS] or 4     # 0 means 4 (Documentation/x86/boot.txt)
    (version,) = struct.unpack_from("<H", view, OFF_VERSION)
    (code32_start,) = struct.unpack_from("<I", view, OFF_CODE32_START)
    start = (setup_sects + 1) * SECTOR
    if start >= len(view):
        raise ConfigurationError(f"kernel: bzImage of {len(view)} bytes ends inside its "
                                 f"{setup_sects} setup sectors")
    if version < LGUEST_BOOT_PROTOCOL:
        log.warning("lguest boot: bzImage declares boot protocol %#x, older than 2.07: it "
                    "cannot know hardware_subarch and will probably not boot as an lguest "
                    "guest", version)
    return KernelImage("bzImage", code32_start,
                       (Segment(BZIMAGE_LOAD_ADDRESS, view[start:]),), version)


def _check_fits(what: str, start: int, end: int, ram_size: int) -> None:
    if start < LOW_RESERVED or end > ram_size:
        raise ConfigurationError(
            f"{what} at {start:#x}..{end:#x} does not fit in guest RAM: it must lie between "
            f"{LOW_RESERVED:#x} (after the zero page and command line) and {ram_size:#x} "
            "(use more memory)")


def load_kernel(memory: GuestMemory, data: bytes | memoryview, ram_size: int) -> KernelImage:
    """Parse `data` and copy its segments into `memory`; returns the image (entry = start)."""
    image = parse_kernel(data)
    for seg in image.segments:
        _check_fits(f"kernel ({image.kind}) segment", seg.address, seg.end, ram_size)
    for seg in image.segments:
        memory.write(seg.address, seg.data)
        if seg.zero:
            memory.write(seg.address + len(seg.data), bytes(seg.zero))
    log.info("lguest boot: %s kernel at %#x..%#x, entry %#x", image.kind, image.start,
             image.end, image.entry)
    return image


def place_initrd(memory: GuestMemory, data: bytes | memoryview, ram_size: int, *,
                 kernel_end: int = 0) -> tuple[int, int]:
    """Copy an initrd to the top of RAM, page-aligned; returns (address, rounded size)."""
    size = -(-len(data) // PAGE_SIZE) * PAGE_SIZE
    if size == 0:
        raise ConfigurationError("initrd is empty")
    address = ram_size - size
    _check_fits(f"initrd of {len(data)} bytes", address, ram_size, ram_size)
    if address < kernel_end:
        raise ConfigurationError(f"initrd at {address:#x} would overlap the kernel, which ends "
                                 f"at {kernel_end:#x} (use more memory)")
    memory.write(address, data)
    memory.write(address + len(data), bytes(size - len(data)))
    return address, size


def boot_params(ram_size: int, *, initrd: tuple[int, int] | None = None) -> bytes:
    """The zero page as the 3.x Launcher filled it (see the module docstring)."""
    if not 0 < ram_size < 1 << 32:
        raise ConfigurationError(f"guest RAM size {ram_size:#x} does not fit the 32-bit "
                                 "boot protocol")
    page = bytearray(BOOT_PARAMS_SIZE)
    page[OFF_E820_ENTRIES] = 1
    E820_ENTRY.pack_into(page, OFF_E820_MAP, 0, ram_size, E820_RAM)
    struct.pack_into("<I", page, OFF_CMD_LINE_PTR, CMDLINE_ADDRESS)
    struct.pack_into("<I", page, OFF_KERNEL_ALIGNMENT, LGUEST_KERNEL_ALIGNMENT)
    struct.pack_into("<H", page, OFF_VERSION, LGUEST_BOOT_PROTOCOL)
    struct.pack_into("<I", page, OFF_HARDWARE_SUBARCH, X86_SUBARCH_LGUEST)
    page[OFF_LOADFLAGS] |= KEEP_SEGMENTS
    if initrd is not None:
        address, size = initrd
        struct.pack_into("<II", page, OFF_RAMDISK_IMAGE, address, size)
        page[OFF_TYPE_OF_LOADER] = LOADER_UNKNOWN
    return bytes(page)


def command_line(cmdline: str | bytes) -> bytes:
    """The NUL-terminated command line; ConfigurationError if too long or holding a NUL."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise ConfigurationError("kernel command line contains a NUL byte")
    if len(raw) >= COMMAND_LINE_SIZE:
        raise ConfigurationError(f"kernel command line of {len(raw)} bytes is longer than "
                                 f"the kernel's {COMMAND_LINE_SIZE - 1}")
    return raw + b"\0"


def write_boot_params(memory: GuestMemory, ram_size: int, cmdline: str | bytes, *,
                      initrd: tuple[int, int] | None = None) -> None:
    """Write the zero page at 0 and the command line at CMDLINE_ADDRESS."""
    line = command_line(cmdline)
    memory.write(0, boot_params(ram_size, initrd=initrd))
    memory.write(CMDLINE_ADDRESS, line)


def prepare_boot(memory: GuestMemory, ram_size: int, kernel: bytes | memoryview,
                 cmdline: str | bytes = "", initrd: bytes | memoryview | None = None
                 ) -> BootLayout:
    """Kernel, initrd and zero page into `memory` (RAM is [0, ram_size)); returns the layout.

    Everything is checked before the first byte is written.
    """
    command_line(cmdline)
    image = parse_kernel(kernel)
    for seg in image.segments:
        _check_fits(f"kernel ({image.kind}) segment", seg.address, seg.end, ram_size)
    if initrd is not None:
        size = -(-len(initrd) // PAGE_SIZE) * PAGE_SIZE
        if size and ram_size - size < image.end:
            raise ConfigurationError(f"initrd of {len(initrd)} bytes at {ram_size - size:#x} "
                                     f"would overlap the kernel, which ends at "
                                     f"{image.end:#x} (use more memory)")
    load_kernel(memory, kernel, ram_size)
    placed = None
    if initrd is not None:
        placed = place_initrd(memory, initrd, ram_size, kernel_end=image.end)
    write_boot_params(memory, ram_size, cmdline, initrd=placed)
    address, size = placed if placed is not None else (0, 0)
    return BootLayout(image.entry, image, address, size)
