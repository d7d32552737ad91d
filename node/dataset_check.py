"""Is this encoded data set whole, and encoded as it says?  Checks before anything is acknowledged.

pydicom reads leniently: it guesses explicit VR in a data set sent as implicit, stops quietly at a
value cut short, and parses trailing garbage into odd elements.  A file stored that way cannot be
read by stricter tools (DCMTK).  :func:`structure_problem` walks the encoded elements under the
transfer syntax that was negotiated (lengths, VRs, tag order, sequence and item delimiters, the
end of the data) without decoding values; :func:`image_problem` checks an image SOP class has its
Image Pixel module and (uncompressed) as many pixel bytes as its size needs; :func:`uid_problem`
checks a UID is a DICOM UID.  Each returns ``None`` or one line saying what is wrong and where.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID

__all__ = ["structure_problem", "part10_problem", "image_problem", "uid_problem", "is_image_storage"]

_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE = {_IMPLICIT, "1.2.840.10008.1.2.1", _EXPLICIT_BE}

_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LAX_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_DEPTH = 16


class _Bad(Exception):
    pass


def _name(tag: int) -> str:
    kw = keyword_for_tag(tag) if tag >> 16 != 0xFFFE else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {kw}" if kw else "")


class _Walker:
    def __init__(self, buf: bytes, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.e = "<" if little else ">"

    def tag_at(self, pos: int) -> int:
        g, el = struct.unpack_from(self.e + "HH", self.buf, pos)
        return int(g) << 16 | int(el)

    def elements(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; returns the position after them (after the item delimiter
        when ``in_item`` and the item has undefined length, ``end`` otherwise)."""
        last = -1
        while pos < end:
            if end - pos < 8:
                raise _Bad(f"{end - pos} byte(s) at offset {pos} are no element: truncated or trailing bytes")
            tag = self.tag_at(pos)
            if tag == _ITEM_END and in_item:
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise _Bad(f"delimiter {_name(tag)} at offset {pos} outside its place")
            if tag <= last:
                raise _Bad(f"element {_name(tag)} at offset {pos} follows {_name(last)}: out of order "
                           "(trailing bytes, or not the negotiated transfer syntax)")
            if tag >> 16 in (0x0000, 0x0001, 0x0003, 0x0005, 0x0007) or tag >> 16 == 0xFFFF:
                raise _Bad(f"element {_name(tag)} at offset {pos} has an illegal group")
            vr: bytes | None
            if self.implicit:
                (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
                vr, pos = None, pos + 8
            else:
                vr = self.buf[pos + 4: pos + 6]
                if vr not in _VRS:
                    raise _Bad(f"element {_name(tag)} at offset {pos} has no valid VR ({vr!r}): not explicit VR")
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise _Bad(f"element {_name(tag)} at offset {pos} is cut in its header: truncated")
                    (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.e + "H", self.buf, pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    pos = self.fragments(pos, end)
                elif vr in (None, b"SQ", b"UN"):
                    pos = self.items(tag, pos, end, None, depth)
                else:
                    raise _Bad(f"element {_name(tag)} ({vr.decode()}) at offset {pos} has undefined length")
            else:
                if pos + length > end:
                    raise _Bad(f"element {_name(tag)} at offset {pos} claims {length} bytes, {end - pos} remain: "
                               "truncated" + ("" if depth == 0 else " (inside a sequence)"))
                is_sq = vr == b"SQ" or (vr is None and _dict_vr(tag) == "SQ")
                if is_sq and length:
                    self.items(tag, pos, pos + length, pos + length, depth)
                pos += length
            last = tag
        if in_item:
            raise _Bad("an item of undefined length has no item delimiter: truncated")
        return pos

    def items(self, seq: int, pos: int, end: int, defined_end: int | None, depth: int) -> int:
        if depth >= _MAX_DEPTH:
            raise _Bad(f"sequences nested more than {_MAX_DEPTH} deep at {_name(seq)}")
        while pos < end:
            if end - pos < 8:
                raise _Bad(f"sequence {_name(seq)} is cut at offset {pos}: truncated")
            tag = self.tag_at(pos)
            (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
            pos += 8
            if tag == _SEQ_END and defined_end is None:
                return pos
            if tag != _ITEM:
                raise _Bad(f"sequence {_name(seq)} holds {_name(tag)} at offset {pos - 8} where an item belongs")
            if length == _UNDEFINED:
                pos = self.elements(pos, end, depth + 1, in_item=True)
            else:
                if pos + length > end:
                    raise _Bad(f"an item of {_name(seq)} at offset {pos} claims {length} bytes, {end - pos} remain: "
                               "truncated")
                self.elements(pos, pos + length, depth + 1, in_item=False)
                pos += length
        if defined_end is None:
            raise _Bad(f"sequence {_name(seq)} of undefined length has no delimiter: truncated")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        while pos + 8 <= end:
            tag = self.tag_at(pos)
            (length,) = struct.unpack_from(self.e + "L", self.buf, pos + 4)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED or pos + length > end:
                raise _Bad(f"encapsulated PixelData is cut or corrupt at offset {pos - 8}: truncated in PixelData")
            pos += length
        raise _Bad("encapsulated PixelData has no sequence delimiter: truncated in PixelData")


def _dict_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def structure_problem(data: bytes, transfer_syntax: str) -> str | None:
    """What is wrong with the encoded data set ``data`` under ``transfer_syntax``, or ``None``."""
    ts = str(transfer_syntax)
    if not data:
        return "empty data set (0 bytes)"
    if ts == _DEFLATED:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = d.decompress(data) + d.flush()
        except zlib.error as exc:
            return f"deflated data set cannot be inflated: {exc}"
        if not d.eof:
            return "deflated data set is cut short: truncated"
        if d.unused_data.strip(b"\x00"):
            return f"{len(d.unused_data)} byte(s) after the end of the deflated data set"
        data = inflated
    implicit = ts == _IMPLICIT
    little = ts != _EXPLICIT_BE
    try:
        _Walker(data, implicit, little).elements(0, len(data), 0, in_item=False)
        return None
    except (_Bad, struct.error) as exc:
        problem = str(exc)
    # name the likely cause when the data set is whole in the other VR encoding
    if ts in (_IMPLICIT, "1.2.840.10008.1.2.1"):
        try:
            _Walker(data, not implicit, True).elements(0, len(data), 0, in_item=False)
        except (_Bad, struct.error):
            return problem
        really = "implicit" if not implicit else "explicit"
        return (f"data set is encoded in {really} VR, but the presentation context negotiated "
                f"{'implicit' if implicit else 'explicit'} VR little endian ({problem})")
    return problem


def part10_problem(data: bytes) -> str | None:
    """What is wrong with a Part 10 file's bytes (preamble, file meta, then :func:`structure_problem`
    under its TransferSyntaxUID), or ``None``."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return f"not a DICOM file: no 'DICM' after the preamble ({len(data)} bytes)"
    pos, ts = 132, None
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4: pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if start + length > len(data):
            return "file meta information is cut short: truncated"
        if elem == 0x0010:
            ts = data[start: start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if ts is None:
        return "file meta information has no TransferSyntaxUID"
    return structure_problem(data[pos:], ts)


def is_image_storage(sop_class_uid: str) -> bool:
    """An image storage SOP class (its name ends in "Image Storage": CT, MR, secondary capture, ...)."""
    return UID(sop_class_uid).name.endswith("Image Storage")


def image_problem(ds: Any, sop_class_uid: str, transfer_syntax: str) -> str | None:
    """An image SOP class without its Image Pixel module, or with fewer pixel bytes than its size."""
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not is_image_storage(sop_class_uid):
        if "Rows" in ds and not has_pixels:
            return "image (Rows present) without pixel data: truncated or corrupt"
        return None
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
               if ds.get(k) in (None, "")]
    if not has_pixels:
        missing.append("PixelData")
    if missing:
        return (f"{UID(sop_class_uid).name} without its Image Pixel module: {', '.join(missing)} missing "
                "(truncated before the image?)")
    return pixel_length_problem(ds, transfer_syntax)


def pixel_length_problem(ds: Any, transfer_syntax: str) -> str | None:
    """For uncompressed PixelData: its length against Rows x Columns x samples x bits x frames."""
    if str(transfer_syntax) not in _NATIVE and str(transfer_syntax) != _DEFLATED:
        return None
    if "PixelData" not in ds:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, AttributeError) as exc:
        return f"image size tags are not numbers: {exc}"
    need = (rows * cols * spp * frames * bits + 7) // 8
    elem = ds["PixelData"]
    have = len(elem.value) if elem.value is not None else 0
    if have < need:
        return (f"PixelData has {have} bytes; Rows {rows} x Columns {cols} x SamplesPerPixel {spp} x "
                f"BitsAllocated {bits} x frames {frames} need {need}: truncated in PixelData")
    return None


def uid_problem(keyword: str, uid: str) -> str | None:
    """``None`` when ``uid`` is a DICOM UID (digits and dots, at most 64 characters).

    Components with leading zeros, which the standard forbids but older devices write, are
    accepted: they are still safe and distinct as file names.
    """
    if len(uid) > 64:
        return f"{keyword} is {len(uid)} characters long (a UID has at most 64)"
    if not _UID_LAX_RE.match(uid):
        return f"{keyword} {uid[:80]!r} is not a DICOM UID (only digits and dots)"
    return None
