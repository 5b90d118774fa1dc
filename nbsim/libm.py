"""Square root, sine and cosine rounded as the C program's math library rounds them.

nanoBragg calls the C library's ``sqrt``, ``sin`` and ``cos`` on doubles. ATen's CPU kernels are
not those functions: on the CPU this was measured on, ``torch.sqrt`` was one ulp off for about 1 %
of float64 inputs (also for 0-d tensors) and ``torch.sin``/``torch.cos`` for about 0.15 %, while
NumPy's float64 ``sqrt`` is IEEE-exact and its ``sin``/``cos`` equal the C library's (0 of 200 000
random arguments differed). A last bit of the setup (a lattice vector after a rotation, a cell
volume) then shows in a ``%g`` of the setup echo or, near a Bragg peak, in a pixel.

So CPU tensors go through NumPy (no copy); other devices keep torch's functions (CUDA's square
root is the IEEE one). Each function has reverse- and forward-mode derivatives and a vmap rule, so
``torch.autograd``, ``torch.autograd.forward_ad`` and ``torch.func`` all see through it.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["sqrt", "sin", "cos"]


def _numpy_exact(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _via_numpy(fn, x: torch.Tensor) -> torch.Tensor:
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    fn(xc.numpy(), out=out.numpy())
    return out


class _Sqrt(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return _via_numpy(np.sqrt, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad / (2 * out)

    @staticmethod
    def jvp(ctx, tangent):
        (out,) = ctx.saved_tensors
        return tangent / (2 * out)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Sqrt.apply(x), in_dims[0]


class _Sin(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return _via_numpy(np.sin, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return tangent * torch.cos(x)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Sin.apply(x), in_dims[0]


class _Cos(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return _via_numpy(np.cos, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -grad * torch.sin(x)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return -tangent * torch.sin(x)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Cos.apply(x), in_dims[0]


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root, as C's ``sqrt``."""
    return _Sqrt.apply(x) if _numpy_exact(x) else torch.sqrt(x)


def sin(x: torch.Tensor) -> torch.Tensor:
    """Sine as the C library computes it (CPU); torch's elsewhere."""
    return _Sin.apply(x) if _numpy_exact(x) else torch.sin(x)


def cos(x: torch.Tensor) -> torch.Tensor:
    """Cosine as the C library computes it (CPU); torch's elsewhere."""
    return _Cos.apply(x) if _numpy_exact(x) else torch.cos(x)
