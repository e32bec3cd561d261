"""Loading that never unpickles code, and one-line words for what it refuses.

``torch.load(weights_only=True)`` refuses a pickle that names anything but tensors and plain containers,
with a long message that advises ``weights_only=False``; ``numpy.load(allow_pickle=False)`` refuses object
arrays with a message that names ``allow_pickle``. difflab never takes either way round, so its errors say
what was refused, in one line, and never suggest turning the check off.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                "In PyTorch 2.6", "(1)", "(2)", "WeightsUnpickler error: Unsupported operand")


def refusal_reason(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: what was refused, without the advice."""
    text = str(e)
    if "Weights only" not in text and "weights_only" not in text:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        return first or type(e).__name__
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), not only tensors; difflab never unpickles code"
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(_BOILERPLATE) and "weights_only" not in line and "allowlist" not in line:
            return f"it holds something other than tensors ({line}); difflab never unpickles code"
    return "it holds pickled Python objects, not only tensors; difflab never unpickles code"


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                      what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a ValueError naming ``what``, the file and
    the reason in one line."""
    try:
        return torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling and format errors come in many types
        raise ValueError(f"cannot read {what} {path}: {refusal_reason(e)}") from None


def npz_reason(e: BaseException) -> str:
    """One line for a failed ``numpy.load(allow_pickle=False)``."""
    text = " ".join(str(e).split())
    if "allow_pickle" in text or "Object arrays" in text:
        return "it holds object arrays (pickled Python objects), which difflab never loads; save numeric arrays"
    return text or type(e).__name__
