"""The finite check the converter runs on every floating-point tensor as its bytes stream by.

A checkpoint whose weights hold NaN or infinity converts, loads and answers 200 with empty or
garbage text (every logit NaN). Refusing it at conversion, naming the tensor, is cheap: the
test reads the exponent bits with numpy (a value is NaN or infinite exactly when its exponent
field is all ones; float8_e4m3fn has no infinity and one NaN pattern per sign), which runs at
several GB/s here, well above the disk the conversion reads from; no torch is needed.
"""

from __future__ import annotations

import numpy as np

from sllm.errors import CheckpointError

# dtype -> (unsigned view, mask of the bits that are all ones exactly for NaN/inf)
_EXPONENT_MASKS: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "float64": (np.uint64, 0x7FF0000000000000),
    "float32": (np.uint32, 0x7F800000),
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float8_e5m2": (np.uint8, 0x7C),
    "float8_e4m3fn": (np.uint8, 0x7F),  # S.1111.111 is NaN; there is no infinity
}


class FiniteCheck:
    """Feed a tensor's bytes in order (chunks of any length), then ``done``: raises
    ``CheckpointError`` naming the tensor if any value was NaN or infinite. Dtypes without a
    NaN (integers, bool) and the rarer float8 kinds pass unchecked."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype
        self._mask = _EXPONENT_MASKS.get(dtype)
        self._carry = b""
        self.bad = 0
        self.values = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._mask is None:
            return
        view_type, mask = self._mask
        width = np.dtype(view_type).itemsize
        data = memoryview(chunk).cast("B")
        if self._carry:  # the previous chunk ended mid-value
            need = width - len(self._carry)
            self._count(self._carry + bytes(data[:need]), view_type, mask)
            data = data[need:]
            self._carry = b""
        whole = len(data) - len(data) % width
        if whole:
            self._count(data[:whole], view_type, mask)
        self._carry = bytes(data[whole:])

    def _count(self, data: bytes | memoryview, view_type: type, mask: int) -> None:
        values: np.ndarray = np.frombuffer(data, dtype=view_type)
        self.values += values.size
        self.bad += int(np.count_nonzero((values & view_type(mask)) == view_type(mask)))

    def done(self, where: str) -> None:
        if self.bad:
            share = "all" if self.bad == self.values else f"{self.bad} of {self.values}"
            raise CheckpointError(
                f"{where}: tensor {self.name!r} ({self.dtype}) has NaN or infinite values "
                f"({share}): the weights are broken, refusing to convert them"
            )
