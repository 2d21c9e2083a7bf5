"""Kernel, initrd and zero-page loading (vhostpy.lguest_boot), checked byte by byte.

Kernels are synthetic: ELF32/ELF64 files and bzImage setup headers built here with `struct`
from the ELF and x86 boot-protocol definitions, independently of the module's tables. The
expected zero page follows the 3.x tools/lguest/lguest.c (its field values) and
arch/x86/include/uapi/asm/bootparam.h (the offsets).
"""

from __future__ import annotations

import struct

import pytest

from vhostpy.errors import ConfigurationError
from vhostpy.lguest_boot import (
    boot_params,
    command_line,
    load_kernel,
    parse_kernel,
    place_initrd,
    prepare_boot,
)
from vhostpy.memory import GuestMemory

RAM = 16 << 20


def elf32(segments: list[tuple[int, int, bytes, int]], entry: int, *, machine: int = 3,
          etype: int = 2, notes: int = 0) -> bytes:
    """An i386 ET_EXEC with PT_LOAD (vaddr, paddr, data, memsz) segments, plus PT_NOTEs."""
    phnum = len(segments) + notes
    offset = 52 + 32 * phnum
    phdrs, body = b"", b""
    for _ in range(notes):
        phdrs += struct.pack("<8I", 4, 0, 0, 0, 0, 0, 4, 4)
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<8I", 1, offset + len(body), vaddr, paddr, len(data), memsz, 7,
                             0x1000)
        body += data
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, etype, machine, 1, entry, 52, 0, 0, 52, 32,
                       phnum, 40, 0, 0)
    return ehdr + phdrs + body


def elf64(segments: list[tuple[int, int, bytes, int]], entry: int) -> bytes:
    offset = 64 + 56 * len(segments)
    phdrs, body = b"", b""
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset + len(body), vaddr, paddr, len(data),
                             memsz, 0x1000)
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 64, 0, 0, 64, 56,
                       len(segments), 64, 0, 0)
    return ehdr + phdrs + body


def bzimage(payload: bytes, *, setup_sects: int = 2, code32: int = 0x100000,
            version: int = 0x20A) -> bytes:
    """A bzImage: (setup_sects + 1) sectors of real-mode part, then the protected-mode one."""
    setup = bytearray(512 * ((setup_sects or 4) + 1))
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x214, code32)
    return bytes(setup) + payload


def memory(size: int = RAM) -> GuestMemory:
    mem = GuestMemory()
    mem.add_buffer(bytearray(size), 0)
    return mem


# ------------------------------------------------------------------ kernels


def test_vmlinux_elf32_segments_go_to_their_physical_addresses() -> None:
    text, data = b"\x90" * 700 + b"TEXT", b"DATA" * 50
    image = elf32([(0xC0100000, 0x100000, text, len(text)),
                   (0xC1200000, 0x300000, data, len(data) + 0x800)], 0x100000, notes=1)
    mem = memory()
    mem.write(0x300000 + len(data), b"\xff" * 0x800)       # bss must come back zeroed
    kernel = load_kernel(mem, image, RAM)
    assert (kernel.kind, kernel.entry) == ("elf32", 0x100000)
    assert mem.read(0x100000, len(text)) == text
    assert mem.read(0x300000, len(data)) == data
    assert mem.read(0x300000 + len(data), 0x800) == bytes(0x800)
    assert kernel.end == 0x300000 + len(data) + 0x800


def test_vmlinux_elf64_is_parsed_too() -> None:
    payload = b"x86_64" * 10
    kernel = parse_kernel(elf64([(0xFFFFFFFF81000000, 0x1000000, payload, 0x1000)], 0x1000000))
    assert kernel.kind == "elf64" and kernel.entry == 0x1000000
    assert [(s.address, bytes(s.data), s.zero) for s in kernel.segments] == [
        (0x1000000, payload, 0x1000 - len(payload))]


@pytest.mark.parametrize("setup_sects", [2, 0])     # 0 means 4 sectors
def test_bzimage_protected_mode_part_at_1m(setup_sects: int) -> None:
    payload = bytes(range(256)) * 9
    mem = memory()
    kernel = load_kernel(mem, bzimage(payload, setup_sects=setup_sects, code32=0x100000), RAM)
    assert (kernel.kind, kernel.entry, kernel.protocol) == ("bzImage", 0x100000, 0x20A)
    assert mem.read(0x100000, len(payload)) == payload
    assert mem.read(0x100000 + len(payload), 16) == bytes(16)


@pytest.mark.parametrize(("image", "message"), [
    (b"MZ" + bytes(1024), "HdrS"),
    (elf32([(0, 0x100000, b"x", 1)], 0x100000, machine=40), "machine 40"),
    (elf32([(0, 0x100000, b"x", 1)], 0x100000, etype=3), "type 3"),
    (elf32([], 0x100000, notes=1), "no PT_LOAD"),
    (elf32([(0, 0x100000, b"x" * 64, 64)], 0x100000)[:-10], "past the end"),
    (elf32([(0, 0x100000, b"x" * 64, 8)], 0x100000), "memsz"),
    (b"\x7fELF\x03\x01" + bytes(60), "ELF class"),
    (b"\x7fELF\x01", "no ELF header"),
    (bzimage(b"", setup_sects=2), "setup sectors"),
])
def test_bad_kernels_are_configuration_errors(image: bytes, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_kernel(image)


def test_kernel_outside_ram_is_refused_before_any_write() -> None:
    mem = memory()
    image = elf32([(0, 0x100000, b"A" * 16, 16), (0, RAM - 8, b"B" * 16, 16)], 0x100000)
    with pytest.raises(ConfigurationError, match="does not fit"):
        load_kernel(mem, image, RAM)
    assert mem.read(0x100000, 16) == bytes(16)
    with pytest.raises(ConfigurationError, match="does not fit"):     # over the zero page
        load_kernel(mem, elf32([(0, 0x1000, b"C", 1)], 0x1000), RAM)


# ------------------------------------------------------------------ initrd and zero page


def test_initrd_is_page_aligned_at_the_top_of_ram() -> None:
    mem = memory()
    mem.write(RAM - 8192, b"\xee" * 8192)
    addr, size = place_initrd(mem, b"initrd!" * 1000, RAM)       # 7000 bytes -> 2 pages
    assert (addr, size) == (RAM - 8192, 8192)
    assert mem.read(addr, 7000) == b"initrd!" * 1000
    assert mem.read(addr + 7000, 8192 - 7000) == bytes(8192 - 7000)
    with pytest.raises(ConfigurationError, match="overlap the kernel"):
        place_initrd(mem, b"x" * 4096, RAM, kernel_end=RAM - 100)


def _u8(page: bytes, off: int) -> int:
    return page[off]


def _u16(page: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", page, off)[0])


def _u32(page: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", page, off)[0])


def test_zero_page_field_by_field() -> None:
    page = boot_params(RAM, initrd=(RAM - 0x3000, 0x3000))
    assert len(page) == 4096
    assert _u8(page, 0x1E8) == 1                                   # e820_entries
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0, RAM, 1)  # one E820_RAM entry
    assert page[0x2D0 + 20:0x2D0 + 40] == bytes(20)                # and only one
    assert _u32(page, 0x228) == 0x1000                             # cmd_line_ptr
    assert _u16(page, 0x206) == 0x207                              # boot protocol 2.07
    assert _u8(page, 0x211) == 0x40                                # loadflags: KEEP_SEGMENTS
    assert _u32(page, 0x23C) == 1                                  # X86_SUBARCH_LGUEST
    assert _u32(page, 0x230) == 0x1000000                          # kernel_alignment
    assert (_u32(page, 0x218), _u32(page, 0x21C)) == (RAM - 0x3000, 0x3000)
    assert _u8(page, 0x210) == 0xFF                                # type_of_loader
    touched = {0x1E8, 0x206, 0x207, 0x210, 0x211, *range(0x218, 0x220), *range(0x228, 0x22C),
               *range(0x230, 0x234), *range(0x23C, 0x240), *range(0x2D0, 0x2D0 + 20)}
    assert all(page[i] == 0 for i in range(4096) if i not in touched)


def test_zero_page_without_initrd_has_no_ramdisk() -> None:
    page = boot_params(RAM)
    assert (_u32(page, 0x218), _u32(page, 0x21C), _u8(page, 0x210)) == (0, 0, 0)


def test_prepare_boot_writes_everything() -> None:
    mem = memory()
    kernel = bzimage(b"\xcc" * 5000, code32=0x100000)
    layout = prepare_boot(mem, RAM, kernel, "console=hvc0 root=/dev/vda", b"\x1f\x8b" * 10)
    assert layout.entry == 0x100000
    assert (layout.initrd_address, layout.initrd_size) == (RAM - 4096, 4096)
    zero = mem.read(0, 4096)
    assert _u32(zero, 0x218) == RAM - 4096
    assert mem.read(0x1000, 27) == b"console=hvc0 root=/dev/vda\0"
    assert mem.read(0x100000, 5000) == b"\xcc" * 5000
    assert mem.read(RAM - 4096, 20) == b"\x1f\x8b" * 10


def test_bad_command_lines() -> None:
    assert command_line("") == b"\0"
    with pytest.raises(ConfigurationError, match="longer"):
        command_line("x" * 2048)
    with pytest.raises(ConfigurationError, match="NUL"):
        command_line("a\0b")
    mem = memory()
    with pytest.raises(ConfigurationError, match="overlap the kernel"):
        prepare_boot(mem, RAM, bzimage(b"k" * 4096), "", b"i" * (RAM - 0x100000))
    assert mem.read(0, 4096) == bytes(4096)                       # nothing written
