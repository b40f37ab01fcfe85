"""GGUF tensor types: which type each tensor gets for a requested quant, and the row-chunk encoders.

Encoding uses the ``gguf`` package's numpy reference quantizers (the same code llama.cpp's converter uses for
Q8_0 and friends) applied to whole rows, so a tensor can be encoded a chunk of rows at a time and streamed; F16/BF16
use torch's round-to-nearest-even casts, which is what ggml does too.

The k-quant mixes q4_k_s, q4_k_m, q5_k_s, q5_k_m and q6_k are encoded in-process by :mod:`merge_ops.gguf_kquants`
(ggml's reference algorithms, since the ``gguf`` package can only decode them); q2_k and the q3_k mixes are produced
by llama.cpp's own ``llama_model_quantize`` through the optional ``llama-cpp-python`` package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT
from gguf import quants as gq

from .gguf_kquants import ENCODERS as K_ENCODERS
from .gguf_kquants import FALLBACK as K_FALLBACK
from .gguf_kquants import MIX_BASE, mix_type

#: quant name -> (tensor type of 2-D weights, general.file_type)
BASE_QUANTS: dict[str, tuple[T, FT]] = {
    "f32": (T.F32, FT.ALL_F32),
    "f16": (T.F16, FT.MOSTLY_F16),
    "bf16": (T.BF16, FT.MOSTLY_BF16),
    "q8_0": (T.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, FT.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, FT.MOSTLY_Q4_1),
    "q5_0": (T.Q5_0, FT.MOSTLY_Q5_0),
    "q5_1": (T.Q5_1, FT.MOSTLY_Q5_1),
}
#: k-quant mixes written in-process (name -> general.file_type)
K_MIXES: dict[str, FT] = {
    "q4_k_s": FT.MOSTLY_Q4_K_S, "q4_k_m": FT.MOSTLY_Q4_K_M, "q5_k_s": FT.MOSTLY_Q5_K_S, "q5_k_m": FT.MOSTLY_Q5_K_M,
    "q6_k": FT.MOSTLY_Q6_K,
}
#: k-quant mixes only llama.cpp's quantizer builds (name -> llama_ftype), via llama-cpp-python
LLAMA_CPP_QUANTS: dict[str, FT] = {
    "q2_k": FT.MOSTLY_Q2_K, "q3_k_s": FT.MOSTLY_Q3_K_S, "q3_k_m": FT.MOSTLY_Q3_K_M, "q3_k_l": FT.MOSTLY_Q3_K_L,
}
ALL_QUANTS: tuple[str, ...] = tuple(BASE_QUANTS) + tuple(K_MIXES) + tuple(LLAMA_CPP_QUANTS)
IN_PROCESS: tuple[str, ...] = tuple(BASE_QUANTS) + tuple(K_MIXES)


def file_type(quant: str) -> FT:
    return BASE_QUANTS[quant][1] if quant in BASE_QUANTS else K_MIXES[quant]

#: 4- and 5-bit types keep ``output.weight`` (the logit projection) at Q8_0: it is the tensor most sensitive to
#: quantization, which is why llama.cpp's quantizer also keeps it at a higher precision (Q6_K) in these mixes.
LOW_BIT = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_nbytes(t: T, n_cols: int) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    return n_cols // bs * ts


@dataclass(frozen=True)
class TypeChoice:
    ggml_type: T
    note: str | None = None


def choose_type(quant: str, gguf_name: str, shape: tuple[int, ...], n_layers: int = 0,
                has_output: bool = True) -> TypeChoice:
    """The GGML type of one tensor (``shape`` in Hugging Face order: rows, cols)."""
    if len(shape) < 2:
        return TypeChoice(T.F32)  # norms, biases, rope factors: llama.cpp keeps 1-D tensors in F32
    cols = shape[-1]
    if quant in MIX_BASE:
        target = mix_type(quant, gguf_name, shape, n_layers, has_output)
        note = None
        if cols % block_size(target):
            fallback = K_FALLBACK.get(target, T.F16)
            if cols % block_size(fallback):
                fallback = T.F16
            note = (f"{gguf_name}: row length {cols} is not a multiple of {block_size(target)}; stored as "
                    f"{fallback.name} instead of {target.name} (llama.cpp's fallback)")
            target = fallback
        return TypeChoice(target, note)
    target = BASE_QUANTS[quant][0]
    if target in (T.F32, T.F16, T.BF16):
        return TypeChoice(target)
    if target in LOW_BIT and gguf_name == "output.weight":
        target = T.Q8_0
        note = f"{gguf_name}: kept at Q8_0 (logit projection; {quant} elsewhere)"
    else:
        note = None
    if cols % block_size(target):
        return TypeChoice(T.F16, f"{gguf_name}: row length {cols} is not a multiple of {block_size(target)}; "
                                 f"stored as F16 instead of {target.name}")
    return TypeChoice(target, note)


def encode_rows(rows: torch.Tensor, t: T) -> memoryview:
    """Encode a 2-D float32 chunk of rows (or a 1-D tensor) into ``t``'s bytes."""
    if t == T.F32:
        arr = rows.to(torch.float32).contiguous().numpy()
    elif t == T.F16:
        arr = rows.to(torch.float16).contiguous().numpy()
    elif t == T.BF16:
        arr = rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    elif t in K_ENCODERS:
        arr = K_ENCODERS[t](np.ascontiguousarray(rows.to(torch.float32).numpy()))
    else:
        arr = gq.quantize(np.ascontiguousarray(rows.to(torch.float32).numpy()), t)
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def tensor_nbytes(t: T, shape: tuple[int, ...]) -> int:
    n_cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_nbytes(t, n_cols)
