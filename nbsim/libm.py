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
import torch.autograd.forward_ad as fwAD

__all__ = ["sqrt", "sin", "cos"]


def _numpy_exact(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _via_numpy(fn, x: torch.Tensor) -> torch.Tensor:
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    fn(xc.numpy(), out=out.numpy())
    return out


def _exact(np_fn, derivative, saves_output: bool):
    """An autograd function evaluating ``np_fn`` through NumPy: ``derivative(grad, saved)`` gives
    the backward and forward-mode products, ``saved`` being the output (``saves_output``) or the
    input."""
    class Exact(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return _via_numpy(np_fn, x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            saved = output if saves_output else inputs[0]
            ctx.save_for_backward(saved)
            ctx.save_for_forward(saved)

        @staticmethod
        def backward(ctx, grad):
            return derivative(grad, ctx.saved_tensors[0])

        @staticmethod
        def jvp(ctx, tangent):
            return derivative(tangent, ctx.saved_tensors[0])

        @staticmethod
        def vmap(info, in_dims, x):
            return Exact.apply(x), in_dims[0]
    Exact.__name__ = Exact.__qualname__ = f"Exact_{np_fn.__name__}"
    return Exact


_Sqrt = _exact(np.sqrt, lambda g, out: g / (2 * out), saves_output=True)
_Sin = _exact(np.sin, lambda g, x: g * torch.cos(x), saves_output=False)
_Cos = _exact(np.cos, lambda g, x: -g * torch.sin(x), saves_output=False)


def _evaluate(exact, np_fn, torch_fn, x: torch.Tensor) -> torch.Tensor:
    """``np_fn`` through NumPy on the CPU: directly for a plain tensor (the setup's many 0-d angles and
    lengths: ~2 µs instead of the autograd function's ~13 µs), through ``exact`` where a derivative
    may pass (``requires_grad``, a forward-mode dual, a ``torch.func`` transform); ``torch_fn``
    elsewhere."""
    if not _numpy_exact(x):
        return torch_fn(x)
    if (x.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(x)
            or fwAD.unpack_dual(x).tangent is not None):
        return exact.apply(x)
    return _via_numpy(np_fn, x)


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root, as C's ``sqrt``."""
    return _evaluate(_Sqrt, np.sqrt, torch.sqrt, x)


def sin(x: torch.Tensor) -> torch.Tensor:
    """Sine as the C library computes it (CPU); torch's elsewhere."""
    return _evaluate(_Sin, np.sin, torch.sin, x)


def cos(x: torch.Tensor) -> torch.Tensor:
    """Cosine as the C library computes it (CPU); torch's elsewhere."""
    return _evaluate(_Cos, np.cos, torch.cos, x)
