"""`protocol.feature_names`: virtio feature bits by name, for the session's log lines.

The names are checked three ways: against the numbers the spec gives (a hand-written table
below, taken from virtio 1.2 sections 5.1.3, 5.2.3 and 6), against the constants vhostpy's own
devices and rings use (so a log line never names a bit differently from the code that sets
it), and for the shape of the answer (one entry per set bit, ascending, "bit N" when unknown).
"""

from __future__ import annotations

import pytest

from vhostpy import blk, net, virtqueue
from vhostpy import protocol as p
from vhostpy.device import VIRTIO_ID_BLOCK
from vhostpy.protocol import feature_names

SPEC_TRANSPORT = {
    "NOTIFY_ON_EMPTY": 24, "ANY_LAYOUT": 27, "INDIRECT_DESC": 28, "EVENT_IDX": 29,
    "VERSION_1": 32, "ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35,
    "ORDER_PLATFORM": 36, "SR_IOV": 37, "NOTIFICATION_DATA": 38, "RING_RESET": 40,
    "VHOST_USER_F_PROTOCOL_FEATURES": 30, "VHOST_F_LOG_ALL": 26,
}
SPEC_BLK = {"SIZE_MAX": 1, "SEG_MAX": 2, "GEOMETRY": 4, "RO": 5, "BLK_SIZE": 6, "FLUSH": 9,
            "TOPOLOGY": 10, "CONFIG_WCE": 11, "MQ": 12, "DISCARD": 13, "WRITE_ZEROES": 14,
            "LIFETIME": 15, "SECURE_ERASE": 16}
SPEC_NET = {"CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5,
            "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11,
            "HOST_TSO6": 12, "HOST_ECN": 13, "HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16,
            "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19, "GUEST_ANNOUNCE": 21, "MQ": 22,
            "CTRL_MAC_ADDR": 23, "HOST_USO": 56, "HASH_REPORT": 57, "GUEST_HDRLEN": 59,
            "RSS": 60, "RSC_EXT": 61, "STANDBY": 62, "SPEED_DUPLEX": 63}


@pytest.mark.parametrize("device_id", [None, 1, 2, 4])
@pytest.mark.parametrize(("name", "bit"), list(SPEC_TRANSPORT.items()))
def test_transport_bits_named_for_every_device(name: str, bit: int,
                                               device_id: int | None) -> None:
    assert feature_names(1 << bit, device_id) == [name]


@pytest.mark.parametrize(("device_id", "table"), [(2, SPEC_BLK), (1, SPEC_NET)],
                         ids=["blk", "net"])
def test_device_bits_follow_the_spec(device_id: int, table: dict[str, int]) -> None:
    for name, bit in table.items():
        assert feature_names(1 << bit, device_id) == [name], name
        # without the device (or for another device) the bit has no name
        assert feature_names(1 << bit) == [f"bit {bit}"]
    everything = sum(1 << b for b in table.values())
    assert set(feature_names(everything, device_id)) == set(table)


def test_the_device_decides_what_a_bit_means() -> None:
    assert feature_names(1 << 12, 2) == ["MQ"]          # blk's MQ is net's HOST_TSO6
    assert feature_names(1 << 12, 1) == ["HOST_TSO6"]
    assert feature_names(1 << 22, 1) == ["MQ"]
    assert feature_names(1 << 22, 2) == ["bit 22"]
    assert feature_names(1 << 5, 4) == ["bit 5"]        # rng has no feature bits of its own


def test_names_agree_with_the_constants_the_code_uses() -> None:
    uses = {
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_RO): "RO",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_FLUSH): "FLUSH",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_MQ): "MQ",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_DISCARD): "DISCARD",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_WRITE_ZEROES): "WRITE_ZEROES",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_SEG_MAX): "SEG_MAX",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_SIZE_MAX): "SIZE_MAX",
        (VIRTIO_ID_BLOCK, blk.VIRTIO_BLK_F_BLK_SIZE): "BLK_SIZE",
        (1, net.VIRTIO_NET_F_CSUM): "CSUM",
        (1, net.VIRTIO_NET_F_MTU): "MTU",
        (1, net.VIRTIO_NET_F_MAC): "MAC",
        (1, net.VIRTIO_NET_F_MRG_RXBUF): "MRG_RXBUF",
        (1, net.VIRTIO_NET_F_STATUS): "STATUS",
        (1, net.VIRTIO_NET_F_MQ): "MQ",
        (None, virtqueue.VIRTIO_RING_F_INDIRECT_DESC): "INDIRECT_DESC",
        (None, virtqueue.VIRTIO_RING_F_EVENT_IDX): "EVENT_IDX",
        (None, virtqueue.VIRTIO_F_VERSION_1): "VERSION_1",
        (None, virtqueue.VIRTIO_F_IN_ORDER): "IN_ORDER",
        (None, p.VHOST_USER_F_PROTOCOL_FEATURES): "VHOST_USER_F_PROTOCOL_FEATURES",
        (None, p.VHOST_F_LOG_ALL): "VHOST_F_LOG_ALL",
    }
    for (device_id, bit), name in uses.items():
        assert feature_names(1 << bit, device_id) == [name]


def test_a_real_feature_word_in_bit_order() -> None:
    # what QEMU 7.2's vhost-user-blk-pci acks from vhostpy blk, plus one bit nobody named
    bits = sum(1 << b for b in (1, 2, 6, 9, 13, 14, 28, 29, 30, 32, 45))
    assert feature_names(bits, 2) == [
        "SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "DISCARD", "WRITE_ZEROES",
        "INDIRECT_DESC", "EVENT_IDX", "VHOST_USER_F_PROTOCOL_FEATURES", "VERSION_1", "bit 45"]


def test_one_entry_per_set_bit_and_unknown_bits() -> None:
    assert feature_names(0) == []
    assert feature_names(0, 1) == []
    every = (1 << 64) - 1
    for device_id in (None, 1, 2, 3, 99):
        names = feature_names(every, device_id)
        assert len(names) == 64
        assert len(set(names)) == 64          # no name given to two bits of one device
    assert feature_names(1 << 70, 1) == ["bit 70"]
    assert feature_names(1 << 25) == ["bit 25"]   # reserved, never assigned
    with pytest.raises(ValueError, match="negative"):
        feature_names(-1)
