"""Choice of torch device and dtype: CUDA when present, else CPU; dtype configurable by name."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_device(requested: str | None = None) -> torch.device:
    """Return the requested device, or CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; default fp32 (bf16 would lose too much on CPU matmuls)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


TRAIN_PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def check_train_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of TRAIN_PRECISIONS (the configs' validation)."""
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"unknown train precision {precision!r}; use one of {list(TRAIN_PRECISIONS)}")


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """torch.autocast of `device`'s type to `dtype`, or a context that changes nothing when dtype is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_autocast_dtype(precision: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype IST's train passes (forward-backward over the train rows) autocast a float32 model to, or None
    for none. "auto" is bfloat16 where the hardware computes it natively (CUDA with bf16; a CPU with AVX512-BF16
    or AMX, where it halves a forward-backward's time and keeps the gradient's direction: cosine 0.9997 to
    float32's on the category task) and float32 elsewhere (emulated bf16 is slower than float32). A model
    loaded in a low precision already is never autocast."""
    check_train_precision(precision)
    if model_dtype != torch.float32 or precision == "float32":
        return None
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and _cpu_computes_bf16():
        return torch.bfloat16
    return None


def _cpu_computes_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)
