"""Which CUDA devices this process holds a context on, from the driver itself
(``cuDevicePrimaryCtxGetState``): what torch reports as current says nothing about a context
some earlier call opened on another device."""

from __future__ import annotations

import ctypes


def active_contexts() -> list[int]:
    """Ordinals (the CUDA runtime's, without CUDA_VISIBLE_DEVICES) with an active primary
    context in this process."""
    cuda = ctypes.CDLL("libcuda.so.1")
    if cuda.cuInit(0) != 0:
        raise RuntimeError("cuInit failed")
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        raise RuntimeError("cuDeviceGetCount failed")
    active_on: list[int] = []
    for ordinal in range(count.value):
        device = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            raise RuntimeError(f"cuDeviceGet({ordinal}) failed")
        flags, active = ctypes.c_uint(), ctypes.c_int()
        if cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)):
            raise RuntimeError(f"cuDevicePrimaryCtxGetState({ordinal}) failed")
        if active.value:
            active_on.append(ordinal)
    return active_on
