"""Unit conversions, rounded exactly as nanoBragg's C code rounds them: the one place they live.

C converts each command-line value with one IEEE operation (``atof(argv[i+1])/1000.0`` for a length
in mm, ``/RTD`` for an angle, ``/1.0e10`` for a wavelength in Å, ...). The algebraically equal
``x * 1e-3`` or ``x * (π/180)`` rounds differently for about one value in eight (0.369 mm: 3.69e-4
against C's 3.6899999999999997e-4), and a last-bit change of a length can reach a pixel's float32
value near a Bragg peak or a ``%g`` in a header. Every function takes a number or a tensor (a
tensor keeps its graph).
"""
from __future__ import annotations

import math

#: C's ``RTD = 180.0*M_1_PI`` (degrees per radian)
RTD = 180.0 * (1.0 / math.pi)


def mm_to_m(x):
    """Length in mm → m: C's ``x/1000.0`` (distances, pixel, beam centre, detector and sample sizes,
    beam size)."""
    return x / 1000.0


def deg_to_rad(x):
    """Angle in degrees → radians: C's ``x/RTD`` (cell angles, misset, φ, oscillation, mosaic spread,
    detector rotations, two-theta)."""
    return x / RTD


def mrad_to_rad(x):
    """Divergence in mrad → radians: C's ``x/1000.0``."""
    return x / 1000.0


def angstrom_to_m(x):
    """Wavelength in Å → m: C's ``x/1.0e10``."""
    return x / 1.0e10


def um_to_m(x):
    """Sensor thickness or attenuation length in µm → m: C's ``x*1e-6``."""
    return x * 1e-6


def water_um_to_m(x):
    """Water droplet size in µm → m: C's ``x/1e6`` (``-water``; unlike the sensor's ``*1e-6``)."""
    return x / 1e6


def percent_to_fraction(x):
    """Spectral dispersion in % → fraction: C's ``x/100.0``."""
    return x / 100.0
