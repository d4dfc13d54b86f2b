"""Codecs for what crosses the wire: fp32 in, a flat uint8 payload out, and back to fp32.

Formats (choose with `make_codec`):

- "fp4": OCP-MX style FP4 **E2M1** elements (1 sign, 2 exponent, 1 mantissa bit; the
  magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), two per byte, one **bf16 scale per block** of
  `block` (default 32) elements, scale = block absmax / 6 rounded *up* to bf16 so the
  largest element maps onto 6 and nothing clips. 4 + 16/32 = 4.5 bits per element.
  Why this one: E2M1 is the 4-bit float of the Streaming DiLoCo paper and of MXFP4 /
  NVFP4 hardware, so a GPU build can swap in native kernels with the same bytes. A float
  grid keeps relative precision for the many small pseudo-gradient entries, which an
  int4 grid would flush to zero. A bf16 scale instead of MX's power-of-two E8M0 scale
  costs 0.25 bit per element but lets the block max land exactly on 6 instead of
  anywhere in (3, 6], halving the worst-case error of the largest entries; bf16 rather
  than fp16 because pseudo-gradients go far below fp16's range.
  Rounding is to nearest; per element |x - q(x)| <= max(|x|, s) / 4, s the block scale.
- "int8": symmetric int8 in [-127, 127] with a bf16 scale (absmax / 127, rounded up) per
  block; |x - q(x)| <= s / 2. 8.5 bits per element.
- "bf16": round to nearest bf16; relative error <= 2**-8. 16 bits per element.
- None / "fp32": the raw fp32 bytes; exact. 32 bits per element.

`encode` takes a 1-D float tensor whose length is a multiple of `codec.block`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class Codec(Protocol):
    name: str
    block: int

    def payload_bytes(self, numel: int) -> int: ...

    def encode(self, values: torch.Tensor) -> torch.Tensor: ...

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor: ...


def _block_scales(blocks: torch.Tensor, top: float) -> torch.Tensor:
    """bf16 per-row scales: the smallest bf16 >= absmax / top (0 for an all-zero row)."""
    wanted = blocks.abs().amax(dim=1) / top
    scales = wanted.to(torch.bfloat16)
    too_small = (scales.float() < wanted).to(torch.int16)
    return (scales.view(torch.int16) + too_small).view(torch.bfloat16)  # next bf16 up


def _check_length(values: torch.Tensor, block: int) -> None:
    if values.dim() != 1 or values.numel() % block:
        raise ValueError(f"encode needs a 1-D tensor with a multiple of {block} elements")


def _safe(scales: torch.Tensor) -> torch.Tensor:
    return torch.where(scales > 0, scales, torch.ones_like(scales))


@dataclass(frozen=True)
class FP4E2M1Codec:
    block: int = 32
    name: str = "fp4"

    def payload_bytes(self, numel: int) -> int:
        return numel // 2 + 2 * (numel // self.block)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        _check_length(values, self.block)
        blocks = values.float().view(-1, self.block)
        scales = _block_scales(blocks, E2M1_GRID[-1])
        scaled = blocks.abs() / _safe(scales.float())[:, None]
        midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=scaled.dtype, device=scaled.device)
        codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
        codes |= (blocks < 0).to(torch.uint8) << 3
        pairs = codes.view(-1, 2)
        packed = pairs[:, 0] | (pairs[:, 1] << 4)
        return torch.cat([packed, scales.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        packed, scale_bytes = payload[: numel // 2], payload[numel // 2 :]
        scales = scale_bytes.contiguous().view(torch.bfloat16).float()
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1).long()
        grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=payload.device)
        magnitude = grid[codes & 7]
        signed = torch.where(codes >= 8, -magnitude, magnitude)
        return (signed.view(-1, self.block) * scales[:, None]).view(-1)


@dataclass(frozen=True)
class Int8Codec:
    block: int = 32
    name: str = "int8"

    def payload_bytes(self, numel: int) -> int:
        return numel + 2 * (numel // self.block)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        _check_length(values, self.block)
        blocks = values.float().view(-1, self.block)
        scales = _block_scales(blocks, 127.0)
        q = torch.round(blocks / _safe(scales.float())[:, None]).clamp_(-127, 127)
        return torch.cat([q.to(torch.int8).view(-1).view(torch.uint8), scales.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        q = payload[:numel].contiguous().view(torch.int8).float()
        scales = payload[numel:].contiguous().view(torch.bfloat16).float()
        return (q.view(-1, self.block) * scales[:, None]).view(-1)


@dataclass(frozen=True)
class CastCodec:
    """A plain cast to `dtype` (bf16) or the raw bytes (fp32)."""

    dtype: torch.dtype = torch.float32
    name: str = "fp32"
    block: int = 1

    def payload_bytes(self, numel: int) -> int:
        return numel * torch.tensor([], dtype=self.dtype).element_size()

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        _check_length(values, self.block)
        return values.to(self.dtype).contiguous().view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.contiguous().view(self.dtype)[:numel].float()


def make_codec(quantization: str | None, block: int = 32) -> Codec:
    """The codec for a `DiLoCoConfig.quantization` value."""
    if quantization == "fp4":
        return FP4E2M1Codec(block=block)
    if quantization == "int8":
        return Int8Codec(block=block)
    if quantization == "bf16":
        return CastCodec(dtype=torch.bfloat16, name="bf16")
    if quantization in (None, "fp32"):
        return CastCodec()
    raise ValueError(f"unknown quantization {quantization!r}: use fp4, int8, bf16 or None")


def roundtrip(codec: Codec, values: torch.Tensor) -> torch.Tensor:
    """decode(encode(values)): what a receiver sees."""
    return codec.decode(codec.encode(values), values.numel())
