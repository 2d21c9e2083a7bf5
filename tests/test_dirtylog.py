"""The migration dirty log (`vhostpy.dirtylog`): one bit per 4 KiB guest page, bit order and
byte layout as the front-end reads them, ranges across byte and page boundaries, writes past
the log's end, and bits the front-end cleared meanwhile."""

from __future__ import annotations

import random

import pytest

from vhostpy.dirtylog import LOG_PAGE, DirtyLog, log_size


def test_log_size_covers_memory_in_pages() -> None:
    assert log_size(0) == 0
    assert log_size(1) == 1
    assert log_size(8 * LOG_PAGE) == 1 and log_size(8 * LOG_PAGE + 1) == 2
    assert log_size(256 << 20) == (256 << 20) // LOG_PAGE // 8 == 8192


def test_bits_are_pages_low_bit_first() -> None:
    log = DirtyLog(memoryview(bytearray(4)))
    assert log.mark(0, 1)
    assert log.mark(9 * LOG_PAGE + 100, 1)                  # page 9: byte 1, bit 1
    assert bytes(log.view) == bytes([0b1, 0b10, 0, 0])
    assert log.mark(3 * LOG_PAGE - 1, 2)                    # straddles pages 2 and 3
    assert bytes(log.view)[0] == 0b1101
    assert log.dirty_pages() == [0, 2, 3, 9]


def test_long_ranges_match_a_page_by_page_model() -> None:
    rng = random.Random(3)
    for _ in range(300):
        size = rng.randint(1, 16)
        log = DirtyLog(memoryview(bytearray(size)))
        model = bytearray(size)
        for _ in range(rng.randint(1, 4)):
            gpa = rng.randrange(size * 8 * LOG_PAGE)
            length = rng.randint(1, 40 * LOG_PAGE)
            inside = log.mark(gpa, length)
            last = (gpa + length - 1) // LOG_PAGE
            assert inside == (last < size * 8)
            for page in range(gpa // LOG_PAGE, min(last, size * 8 - 1) + 1):
                model[page // 8] |= 1 << page % 8
        assert bytes(log.view) == bytes(model)


def test_past_the_end_is_counted_and_the_inside_part_marked() -> None:
    log = DirtyLog(memoryview(bytearray(1)))                # 8 pages
    assert log.mark(7 * LOG_PAGE, 2 * LOG_PAGE) is False
    assert log.dirty_pages() == [7] and log.outside == 1
    assert log.mark(100 * LOG_PAGE, 1) is False             # wholly outside: nothing set
    assert log.dirty_pages() == [7] and log.outside == 2
    assert log.mark(0, 0) is True and log.pages_marked == 1


def test_a_bit_the_front_end_cleared_comes_back_only_when_written_again() -> None:
    buf = bytearray(2)
    log = DirtyLog(memoryview(buf))
    log.mark(0, 3 * LOG_PAGE)
    buf[0] = 0                                              # the front-end collected them
    log.mark(9 * LOG_PAGE, 1)
    assert log.dirty_pages() == [9]


def test_a_read_only_log_is_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        DirtyLog(memoryview(b"\0\0"))
