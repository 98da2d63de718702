"""fingerprint: a 64-bit hash of CPU tensors' bytes (the C++ op ``resnet_fused::fingerprint``,
csrc/cpu/fingerprint.cpp), which the eval fold cache of the modules compares at every call
to notice writes that bump no version counter (through ``.data``, ``.detach()``, numpy).

It has no fake kernel: its result is a Python int computed from the tensors' contents,
which a traced graph cannot hold, and nothing calls it under torch.compile (the fold cache
is off there). Without the compiled extension (or with one built before this op existed)
:data:`FINGERPRINT` is None and the modules refold at every call instead of caching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _extension


def _lookup():
    if not _extension.is_loaded():
        return None
    try:
        op = torch.ops.resnet_fused.fingerprint.default
    except (AttributeError, RuntimeError):  # an extension built before the op existed
        return None
    # The overload's C++ callable itself: OpOverload.__call__ adds a Python frame to a
    # call the fold cache makes at every eval call (~0.25 us of ~1.6 us).
    return getattr(op, "_op", op)


#: ``FINGERPRINT(list_of_cpu_tensors) -> int``, or None where the op is missing.
FINGERPRINT = _lookup()


def fingerprint(tensors: Sequence[Tensor]) -> int:
    """The 64-bit hash (a signed int) of the CPU tensors' bytes, in order: equal for equal
    bytes (dtype and shape aside), read in memory order where a tensor's elements fill one
    block of memory (contiguous, channels_last: no copy), else in logical order (other
    views, copied first); changed by any
    change of one 32-bit word (a single-element edit of fp32, fp16, bf16), and by any other
    change except by coincidence (about 2^-64; not a cryptographic hash)."""
    if FINGERPRINT is None:
        raise RuntimeError(
            "resnet_fused::fingerprint is not available: the compiled extension did not "
            "import, or was built before the op existed"
        )
    return FINGERPRINT(list(tensors))
