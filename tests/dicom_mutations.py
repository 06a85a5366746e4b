"""Seeded mutations of real RSNA slices for the differential reader test: element-level edits (missing tags, wrong
VRs, odd numbers, bit depths, frames, duplicates, charsets, transfer syntaxes) and byte-level damage (truncation,
overlong lengths, flips). Each mutant is (kind, bytes); pydicom, not this module, says what the bytes mean."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
IMPLICIT, EXPLICIT = b"1.2.840.10008.1.2\x00", b"1.2.840.10008.1.2.1\x00"
TS, PIXELS, FRAMES, CHARSET = 0x00020010, 0x7FE00010, 0x00280008, 0x00080005
ROWS, COLS, SAMPLES, PHOTOMETRIC = 0x00280010, 0x00280011, 0x00280002, 0x00280004
BITS, STORED, HIGH, SIGNED = 0x00280100, 0x00280101, 0x00280102, 0x00280103
INTERCEPT, SLOPE, INSTANCE, IPP, PATIENT = 0x00281052, 0x00281053, 0x00200013, 0x00200032, 0x00100020
NUMBER_TAGS = [INTERCEPT, SLOPE, INSTANCE, IPP, 0x00180050, 0x00280030, 0x00281050]
PIXEL_TAGS = [ROWS, COLS, SAMPLES, PHOTOMETRIC, BITS, STORED, HIGH, SIGNED, INTERCEPT, SLOPE]
# the VR each tag needs, to encode inserted elements in explicit VR
VR_OF = {
    FRAMES: b"IS",
    CHARSET: b"CS",
    SAMPLES: b"US",
    PHOTOMETRIC: b"CS",
    ROWS: b"US",
    COLS: b"US",
    BITS: b"US",
    STORED: b"US",
    HIGH: b"US",
    SIGNED: b"US",
    INTERCEPT: b"DS",
    SLOPE: b"DS",
    INSTANCE: b"IS",
    PIXELS: b"OW",
    0xFFFCFFFC: b"OB",
    0x00081030: b"LO",
}
NUMBERS = [
    b"inf",
    b"-inf",
    b"nan",
    b"1e999",
    b"-1e999",
    b"",
    b" ",
    b"-1024\\",
    b"\\1",
    b"1\\\\2",
    b" 12 ",
    b"1e12",
    b"-40000",
    b"40000",
    b"2147483648",
    b"-2147483649",
    b"99999999999",
    b"1.5",
    b"0x10",
    b"1_0",
    b"+3",
    b"0",
    b"-0.5",
    b"2.0",
    b"1e300",
    b"3\\4",
    b"12\x00",
    b"\x00",
]


@dataclass
class Slice:
    """A flat DICOM file as editable parts: preamble, file meta and dataset elements (tag, VR or None, value)."""

    preamble: bytes
    meta: list[tuple[int, bytes | None, bytes]]
    body: list[tuple[int, bytes | None, bytes]]
    explicit: bool

    def copy(self) -> "Slice":
        return Slice(self.preamble, list(self.meta), list(self.body), self.explicit)

    def find(self, tag: int) -> int | None:
        return next((i for i, (t, _, _) in enumerate(self.body) if t == tag), None)

    def set(self, tag: int, value: bytes) -> None:
        """Replace (or insert in tag order) one element's value."""
        value = value + b" " * (len(value) % 2) if tag != PIXELS else value
        i = self.find(tag)
        if i is not None:
            self.body[i] = (tag, self.body[i][1], value)
            return
        vr = VR_OF.get(tag, b"UN") if self.explicit else None
        at = next((j for j, (t, _, _) in enumerate(self.body) if t > tag), len(self.body))
        self.body.insert(at, (tag, vr, value))

    def drop(self, tag: int) -> None:
        self.body = [e for e in self.body if e[0] != tag]
        self.meta = [e for e in self.meta if e[0] != tag]

    def pixels(self) -> bytes:
        i = self.find(PIXELS)
        assert i is not None
        return self.body[i][2]


def parse(data: bytes) -> Slice:
    """Split a flat little-endian file (the RSNA layout) into its elements."""
    pos, explicit = 132, True
    meta: list = []
    body: list = []
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = (group << 16) | elem
        in_meta = group == 2
        if in_meta or explicit:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG:
                (length,) = struct.unpack_from("<I", data, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                pos += 8
        else:
            vr = None
            (length,) = struct.unpack_from("<I", data, pos + 4)
            pos += 8
        value = data[pos : pos + length]
        pos += length
        if in_meta:
            meta.append((tag, vr, value))
            if tag == TS:
                explicit = value != IMPLICIT
        else:
            body.append((tag, vr if explicit else None, value))
    return Slice(data[:128], meta, body, explicit)


def element(tag: int, vr: bytes | None, value: bytes, length: int | None = None) -> bytes:
    """One encoded element; `length` overrides the length field (overlong or undefined lengths)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr is None:
        return head + struct.pack("<I", n) + value
    if vr in LONG:
        return head + vr + b"\x00\x00" + struct.pack("<I", n) + value
    return head + vr + struct.pack("<H", n & 0xFFFF) + value


def build(s: Slice, preamble: bool = True, meta: bool = True, lengths: dict[int, int] | None = None) -> bytes:
    lengths = lengths or {}
    group = b"".join(element(t, vr, v, lengths.get(t)) for t, vr, v in s.meta if t != 0x00020000)
    head = element(0x00020000, b"UL", struct.pack("<I", len(group))) + group
    out = (s.preamble + b"DICM" if preamble else b"") + (head if meta else b"")
    return out + b"".join(element(t, vr, v, lengths.get(t)) for t, vr, v in s.body)


def _pick(rng, options: list):
    """One of `options` (rng.choice would turn bytes into numpy strings, which drop trailing NULs)."""
    return options[int(rng.integers(0, len(options)))]


def _u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def _image(s: Slice) -> np.ndarray:
    return np.frombuffer(s.pixels(), dtype=np.uint16).copy()


# --- the mutation kinds: each edits a copy of a slice and returns the bytes -----------------------------------


def truncate(rng, s: Slice) -> bytes:
    data = build(s)
    cut = int(rng.integers(0, 2000)) if rng.random() < 0.5 else int(rng.integers(2000, len(data)))
    return data[:cut]


def overlong(rng, s: Slice) -> bytes:
    tag = _pick(rng, [t for t, _, _ in s.body])
    old = len(s.body[s.find(tag)][2])
    return build(s, lengths={tag: _pick(rng, [old + 2, old + 1000, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFE])})


def wrong_vr(rng, s: Slice) -> bytes:
    if not s.explicit:  # relabel the implicit file as explicit: every VR is then "wrong"
        s.meta = [(t, vr, EXPLICIT if t == TS else v) for t, vr, v in s.meta]
        return build(s)
    i = _pick(rng, [s.find(t) for t in PIXEL_TAGS + [PIXELS, INSTANCE, IPP, PATIENT] if s.find(t) is not None])
    tag, _, value = s.body[i]
    vrs = [b"US", b"SS", b"UL", b"DS", b"IS", b"UN", b"OB", b"OW", b"SQ", b"LO", b"XX", b"\x00\x00", b"FD"]
    s.body[i] = (tag, _pick(rng, vrs), value)
    return build(s)


def missing_tag(rng, s: Slice) -> bytes:
    s.drop(_pick(rng, PIXEL_TAGS + [TS, PIXELS, PATIENT, 0x00080060]))
    return build(s)


def bad_number(rng, s: Slice) -> bytes:
    s.set(_pick(rng, NUMBER_TAGS), _pick(rng, NUMBERS))
    return build(s)


def frames(rng, s: Slice) -> bytes:
    n = _pick(rng, [b"2", b"0", b"-1", b"1", b"3", b"inf", b"1e999", b"", b"-2"])
    s.set(FRAMES, n)
    if rng.random() < 0.5 and n in (b"2", b"3"):
        s.set(PIXELS, s.pixels() * int(n))
    if rng.random() < 0.3:
        s.drop(ROWS)
    return build(s)


def bit_depth(rng, s: Slice) -> bytes:
    bits = _pick(rng, [1, 8, 12, 16, 32, 64, 0])
    s.set(BITS, _u16(bits))
    s.set(STORED, _u16(_pick(rng, [bits, bits - 4, 12, 16, 1, 0, 17, 33])))
    if rng.random() < 0.5:
        s.set(SIGNED, _u16(_pick(rng, [0, 1, 2])))
    px = _image(s)
    if rng.random() < 0.8:  # pixel data to match the new depth (else: a length mismatch)
        data = {
            8: px.astype(np.uint8).tobytes(),
            32: px.astype(np.uint32).tobytes(),
            12: s.pixels()[: len(s.pixels()) * 3 // 4],
        }.get(bits, s.pixels())
        s.set(PIXELS, data)
    return build(s)


def high_bits(rng, s: Slice) -> bytes:
    s.set(STORED, _u16(_pick(rng, [12, 10, 15])))
    s.set(SIGNED, _u16(_pick(rng, [0, 1])))
    if rng.random() < 0.5:
        s.set(INTERCEPT, _pick(rng, [b"0", b"-1024", b"1"]))  # 0 or 1: the corrupted RSNA variant
    px = _image(s)
    hit = rng.random(px.size) < 0.2
    px[hit] |= rng.integers(1, 16, hit.sum()).astype(np.uint16) << 12
    s.set(PIXELS, px.tobytes())
    return build(s)


def duplicate(rng, s: Slice) -> bytes:
    choice = rng.integers(0, 3)
    if choice == 0:  # a second PixelData after the first
        second = (rng.permutation(_image(s)) if rng.random() < 0.5 else _image(s)[:100]).tobytes()
        return build(s) + element(PIXELS, b"OW" if s.explicit else None, second)
    i = int(rng.integers(0, len(s.body) - 1))
    tag, vr, value = s.body[i]
    if choice == 1:  # the same tag twice in a row, the second with another value
        other = _u16(int(rng.integers(0, 600))) if len(value) == 2 else value[::-1]
        s.body.insert(i + 1, (tag, vr, other))
    else:  # out of tag order
        j = int(rng.integers(0, len(s.body) - 1))
        s.body[i], s.body[j] = s.body[j], s.body[i]
    return build(s)


def geometry(rng, s: Slice) -> bytes:
    s.set(_pick(rng, [ROWS, COLS]), _u16(_pick(rng, [0, 1, 256, 1024, 65535, 511])))
    if rng.random() < 0.3:
        s.set(SAMPLES, _u16(_pick(rng, [0, 2, 3])))
    if rng.random() < 0.3:
        s.set(
            PHOTOMETRIC,
            _pick(
                rng, [b"MONOCHROME1", b"RGB", b"PALETTE COLOR", b"", b"monochrome2", b"MONOCHROME2\\RGB", b"YBR_FULL"]
            ),
        )
    return build(s)


def surplus(rng, s: Slice) -> bytes:
    choice = rng.integers(0, 3)
    if choice == 0:
        s.set(PIXELS, s.pixels() + bytes(_pick(rng, [2, 4, 1000])))
    elif choice == 1:
        s.set(PIXELS, s.pixels() * 2)  # a whole second frame, NumberOfFrames absent
    else:
        return build(s) + element(0xFFFCFFFC, b"OB" if s.explicit else None, bytes(16))  # trailing padding
    return build(s)


def preamble(rng, s: Slice) -> bytes:
    choice = rng.integers(0, 3)
    if choice == 0:
        return build(s, preamble=False)  # file meta, no preamble
    if choice == 1:
        return build(s, preamble=False, meta=False)  # a bare dataset
    return b"\x00" * 128 + b"DICM" + build(s, preamble=False, meta=False)  # DICM but no file meta


def charset(rng, s: Slice) -> bytes:
    s.set(
        CHARSET,
        _pick(
            rng,
            [
                b"ISO_IR 100",
                b"ISO_IR 192",
                b"ISO 2022 IR 87",
                b"GB18030",
                b"ISO_IR 13",
                b"",
                b"ISO_IR 6",
                b"\\ISO 2022 IR 87",
                b"ISO_IR 144",
            ],
        ),
    )
    if rng.random() < 0.5:
        s.set(
            PATIENT, _pick(rng, [b"ID_\xe9\xe8", b"ID_\x1b$B", b"ID_a\\ID_b", b" ID_lead", b"ID_\x00x", b"ID_\xc3\xa9"])
        )
    return build(s)


def text(rng, s: Slice) -> bytes:
    """Odd ids and modality: padding, several values, control or non-ASCII bytes."""
    tag = _pick(rng, [PATIENT, 0x0020000D, 0x0020000E, 0x00080018, 0x00080060])
    s.set(
        tag,
        _pick(
            rng,
            [
                b" ID_lead",
                b"ID_trail \x00",
                b"ID_a\\ID_b",
                b"ID_\tx",
                b"ID_\xe9",
                b"",
                b" ",
                b"CT ",
                b" CT",
                b"MR",
                b"\x00ID",
                b"ID_" + b"x" * 70,
            ],
        ),
    )
    return build(s)


def transfer_syntax(rng, s: Slice) -> bytes:
    uid = _pick(
        rng,
        [
            b"1.2.840.10008.1.2.2\x00",
            b"1.2.840.10008.1.2.4.50",
            b"1.2.840.10008.1.2.1.99",
            b"1.2.3\x00",
            b"",
            IMPLICIT,
            EXPLICIT,
            b"1.2.840.10008.1.2.5\x00",
        ],
    )
    s.meta = [(t, vr, uid if t == TS else v) for t, vr, v in s.meta]
    return build(s)


def undefined_length(rng, s: Slice) -> bytes:
    tag = PIXELS if rng.random() < 0.6 else _pick(rng, [t for t, _, _ in s.body])
    return build(s, lengths={tag: 0xFFFFFFFF})


def flips(rng, s: Slice) -> bytes:
    data = bytearray(build(s))
    end = len(data) - len(s.pixels())
    for at in rng.integers(128, end, int(rng.integers(1, 6))):
        data[at] = int(rng.integers(0, 256))
    return bytes(data)


def garbage(rng, s: Slice) -> bytes:
    """Random bytes after a real file's first part (or none): whatever a disk error or a wrong file leaves."""
    keep = _pick(rng, [0, 132, 300, 1000])
    return build(s)[:keep] + rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()


KINDS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        truncate,
        overlong,
        wrong_vr,
        missing_tag,
        bad_number,
        frames,
        bit_depth,
        high_bits,
        duplicate,
        geometry,
        surplus,
        preamble,
        charset,
        text,
        transfer_syntax,
        undefined_length,
        flips,
        garbage,
    )
}


def mutants(slices: list[bytes], per_kind: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`per_kind` mutants of each kind, cycling over the given real slices."""
    rng = np.random.default_rng(seed)
    parsed = [parse(s) for s in slices]
    for kind, fn in KINDS.items():
        for i in range(per_kind):
            yield kind, fn(rng, parsed[i % len(parsed)].copy())
