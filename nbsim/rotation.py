"""Rotations of lab-frame vectors, exactly as nanoBragg composes them.

All functions take and return torch tensors; vectors live in the last dimension (``(..., 3)``).
Angles are radians (tensors or Python floats). No branch depends on a tensor value, so every
function is differentiable w.r.t. its angles and axes; a zero angle gives the identity exactly
(cos 0 = 1, sin 0 = 0), which reproduces C's "skip if the angle is 0" bit for bit.
"""
from __future__ import annotations

import torch

from nbsim import libm


def _cs(angle, like: torch.Tensor):
    a = torch.as_tensor(angle, dtype=like.dtype, device=like.device)
    return libm.cos(a), libm.sin(a)


def rotate_xyz(v: torch.Tensor, rx, ry, rz) -> torch.Tensor:
    """Rotate ``v`` (..., 3) about lab x, then y, then z (right-handed), as C ``rotate()``."""
    x, y, z = v.unbind(-1)
    c, s = _cs(rx, v)
    y, z = y * c + z * (-s), y * s + z * c
    c, s = _cs(ry, v)
    x, z = x * c + z * s, x * (-s) + z * c
    c, s = _cs(rz, v)
    x, y = x * c + y * (-s), x * s + y * c
    return torch.stack((x, y, z), dim=-1)


def rotate_axis(v: torch.Tensor, axis: torch.Tensor, phi) -> torch.Tensor:
    """Rodrigues rotation of ``v`` (..., 3) by ``phi`` (rad, broadcastable to v[..., 0]) about the
    unit vector ``axis`` (..., 3), with C ``rotate_axis()``'s operation order."""
    phi = torch.as_tensor(phi, dtype=v.dtype, device=v.device)
    c, s = libm.cos(phi), libm.sin(phi)
    ax, ay, az = axis.unbind(-1)
    vx, vy, vz = v.unbind(-1)
    dot = (ax * vx + ay * vy + az * vz) * (1.0 - c)
    return torch.stack((
        ax * dot + vx * c + (-az * vy + ay * vz) * s,
        ay * dot + vy * c + (az * vx - ax * vz) * s,
        az * dot + vz * c + (-ay * vx + ax * vy) * s,
    ), dim=-1)


def rotate_umat(v: torch.Tensor, umat: torch.Tensor) -> torch.Tensor:
    """Apply the row-major 3x3 matrix ``umat`` (..., 3, 3) to ``v`` (..., 3): new_i = sum_j U_ij v_j."""
    return (umat * v.unsqueeze(-2)).sum(-1)


def unitize(v: torch.Tensor):
    """Return (unit vector, magnitude) of ``v`` (..., 3); a zero vector stays zero (as in C)."""
    mag = libm.sqrt((v * v).sum(-1))
    safe = torch.where(mag == 0, 1.0, mag)
    return v / safe.unsqueeze(-1), mag


def magnitude(v: torch.Tensor) -> torch.Tensor:
    """|v| of a (3,) vector as C's ``magnitude()``: sqrt(x·x + y·y + z·z), correctly rounded."""
    return libm.sqrt(dot(v, v))


def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product of (..., 3) vectors, C component order."""
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product over the last axis, C order (x*x + y*y + z*z)."""
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return ax * bx + ay * by + az * bz
