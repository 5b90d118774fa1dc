"""Random nanoBragg command lines for differential runs against the C program.

``combo(rng)`` draws one command line (without output flags) from the flag families the front end
and the C program share: crystal (cell or ``-mat``, misset, N or sizes, spot shapes, ``-hkl`` with
and without interpolation), beam (wavelength or energy, dispersion, divergence in every form,
``-sourcefile``, polarization), mosaic spread, φ rotation, detector (every convention, custom
vectors, pivots, beam-centre forms, rotations, two-theta, sensor thickness and absorption,
oversampling and its flags, curved and point pixels, ROI), dmin, water background, fluence forms
and the output scales. Detectors are small (24-64 pixels a side), so a combination runs in about
a second. The inputs named (``A.mat``, ``P1.hkl``, ``sources.txt``) are the golden set's, or
files drawn here: ``-mask``/``-img`` an SMV file (``smv_input``: header defaults, masked pixels),
``-mat``/``-hkl`` a random orientation matrix and structure-factor table (``random_matrix``,
``random_hkl``).
"""
from __future__ import annotations

import random


def _num(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}".rstrip("0").rstrip(".")


def random_matrix(rng: random.Random) -> bytes:
    """A MOSFLM A matrix file (reciprocal vectors × λ as columns, then two lines of zeros, like the
    golden ``A.mat``) of a random cell in a random orientation."""
    import numpy as np
    la, lb, lc = (rng.uniform(30, 120) for _ in range(3))
    al, be, ga = (np.radians(rng.uniform(70, 110)) for _ in range(3))
    a = np.array([la, 0.0, 0.0])
    b = lb * np.array([np.cos(ga), np.sin(ga), 0.0])
    cx = np.cos(be)
    cy = (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    c = lc * np.array([cx, cy, np.sqrt(max(1e-6, 1.0 - cx * cx - cy * cy))])
    q, _ = np.linalg.qr(np.random.default_rng(rng.randint(0, 2 ** 31)).normal(size=(3, 3)))
    a, b, c = (q @ v for v in (a, b, c))
    V = a @ np.cross(b, c)
    recip = np.stack((np.cross(b, c), np.cross(c, a), np.cross(a, b)), axis=1) / V   # columns a*, b*, c*
    lines = [" ".join(f"{x:13.10f}" for x in row) for row in recip * rng.uniform(0.7, 1.8)]
    return ("\n".join(lines + [" 0.000 0.000 0.000"] * 2) + "\n").encode()


def random_hkl(rng: random.Random) -> bytes:
    """An ``-hkl`` table ``h k l F`` over a small random box with about one index in five missing."""
    hm, km, lm = (rng.randint(1, 6) for _ in range(3))
    rows = [f"{h:4d} {k:4d} {l:4d} {rng.uniform(0, 300):10.3f}"
            for h in range(-hm, hm + 1) for k in range(-km, km + 1) for l in range(-lm, lm + 1)
            if rng.random() < 0.8]
    return ("\n".join(rows) + "\n").encode()


def _crystal(rng: random.Random, files: dict = None) -> list:
    a = []
    mat, hkl = "A.mat", "P1.hkl"
    if files is not None and rng.random() < 0.4:
        mat, hkl = "rand.mat", "rand.hkl"
        files[mat], files[hkl] = random_matrix(rng), random_hkl(rng)
    F = (["-hkl", hkl] + rng.choice([[], [], ["-interpolate"], ["-nointerpolate"]])
         if rng.random() < 0.5 else ["-default_F", _num(rng.uniform(1, 200))])
    if rng.random() < 0.25:
        a += ["-mat", mat] + F
    else:
        lengths = [rng.uniform(30, 120) for _ in range(3)]
        angles = rng.choice([[90, 90, 90], [90, 90, 120], [rng.uniform(70, 110) for _ in range(3)]])
        a += ["-cell"] + [_num(x) for x in lengths + angles]
        a += F if rng.random() < 0.3 else ["-default_F", _num(rng.uniform(1, 200))]
    r = rng.random()
    if r < 0.3:
        a += ["-misset"] + [_num(rng.uniform(-40, 40)) for _ in range(3)]
    elif r < 0.4:
        a += ["-misset", "random", "-misset_seed", str(rng.randint(1, 99))]
    r = rng.random()
    if r < 0.55:
        a += ["-N", str(rng.randint(1, 8))]
    elif r < 0.8:
        a += [x for ax in ("-Na", "-Nb", "-Nc") for x in (ax, str(rng.randint(1, 8)))]
    elif r < 0.9:
        a += ["-xtalsize", _num(rng.uniform(0.0001, 0.0005), 5)]
    else:
        a += [x for ax in ("-xtal_x", "-xtal_y", "-xtal_z")
              for x in (ax, _num(rng.uniform(0.0001, 0.0005), 5))]
    a += rng.choice([[], [], [], ["-round_xtal"], ["-gauss_xtal"], ["-tophat_spots"], ["-square_xtal"]])
    if rng.random() < 0.2:
        a += ["-fudge", _num(rng.uniform(0.5, 2))]
    if rng.random() < 0.25:
        a += ["-mosaic", _num(rng.uniform(0.05, 2))]
        if rng.random() < 0.8:
            a += [rng.choice(["-mosaic_dom", "-mosaic_domains"]), str(rng.randint(1, 8))]
        a += ["-mosaic_seed", str(rng.randint(1, 999))]
    r = rng.random()
    if r < 0.3:
        a += ["-phi", _num(rng.choice([0.0, rng.uniform(-20, 20)])),
              "-osc", _num(rng.choice([0.0, rng.uniform(0.1, 5)])), "-phisteps", str(rng.randint(1, 4))]
    elif r < 0.38:
        a += ["-phistep", _num(rng.uniform(0.1, 1)), "-osc", _num(rng.uniform(0.5, 2))]
    if r < 0.38 and rng.random() < 0.3:
        a += ["-spindle_axis"] + rng.choice([["0", "1", "0"], ["0", "1", "1"], ["1", "0", "0"],
                                             ["0.3", "-1", "0.2"]])
    return a


def _beam(rng: random.Random) -> list:
    a = (["-lambda", _num(rng.uniform(0.7, 1.8))] if rng.random() < 0.8
         else ["-energy", _num(rng.uniform(7000, 15000), 1)])
    if rng.random() < 0.25:
        a += ["-dispersion", _num(rng.uniform(0.1, 3))]
        if rng.random() < 0.7:
            a += ["-dispsteps", str(rng.randint(1, 4))]
    r = rng.random()
    if r < 0.15:
        a += ["-divergence", _num(rng.uniform(0.1, 3)), "-divsteps", str(rng.randint(1, 4))]
    elif r < 0.25:
        a += ["-hdivrange", _num(rng.uniform(0, 2)), "-vdivrange", _num(rng.uniform(0, 2)),
              "-hdivsteps", str(rng.randint(1, 3)), "-vdivsteps", str(rng.randint(1, 3))]
    elif r < 0.3:
        a += ["-hdivrange", _num(rng.uniform(0.1, 2)), "-hdivstep", _num(rng.uniform(0.05, 0.5))]
    elif r < 0.33:
        a += ["-vdivrange", _num(rng.uniform(0.1, 2)), "-vdivstep", _num(rng.uniform(0.05, 0.5))]
    if r < 0.33 and rng.random() < 0.4:
        a += [rng.choice(["-square_div", "-round_div"])]
    if rng.random() < 0.06:
        a += ["-sourcefile", "sources.txt"]
    r = rng.random()
    if r < 0.2:
        a += ["-polar", _num(rng.uniform(-1, 1))]
    elif r < 0.3:
        a += ["-nopolar"]
    if rng.random() < 0.1:
        a += ["-polar_vector", "0", "1", "0"]
    r = rng.random()
    if r < 0.1:
        a += ["-fluence", _num(rng.uniform(1e22, 1e25), 0)]
    elif r < 0.2:
        a += ["-flux", "1e12", "-exposure", _num(rng.uniform(0.1, 5)),
              "-beamsize", _num(rng.uniform(0.01, 0.2))]
    return a


def _detector(rng: random.Random) -> list:
    a = []
    convention = rng.choice(["", "", "", "-xds", "-dials", "-adxv", "-denzo", "-mosflm", "custom"])
    if convention == "custom":
        a += ["-fdet_vector", "0", "0", "1", "-sdet_vector", "0", "-1", "0", "-odet_vector", "1", "0", "0"]
        if rng.random() < 0.5:
            a += ["-beam_vector", "1", _num(rng.uniform(-0.05, 0.05)), _num(rng.uniform(-0.05, 0.05))]
        if rng.random() < 0.4:
            a += ["-pix0_vector_mm", _num(rng.uniform(80, 150)), _num(rng.uniform(-10, 10)),
                  _num(rng.uniform(-10, 10))]
    elif convention:
        a += [convention]
    nf = rng.randint(24, 64)
    ns = nf if rng.random() < 0.7 else rng.randint(24, 64)
    a += ["-detpixels", str(nf)] if nf == ns else ["-detpixels_f", str(nf), "-detpixels_s", str(ns)]
    pixel = rng.uniform(0.1, 0.5)
    a += ["-pixel", _num(pixel)]
    a += [rng.choice(["-distance", "-distance", "-distance", "-close_distance"]),
          _num(rng.uniform(50, 200))]
    if rng.random() < 0.2:
        a += ["-pivot", rng.choice(["beam", "sample"])]
    r = rng.random()
    if r < 0.2:
        a += ["-Xbeam", _num(rng.uniform(0, nf * pixel)), "-Ybeam", _num(rng.uniform(0, ns * pixel))]
    elif r < 0.3:
        a += ["-ORGX", _num(rng.uniform(0, nf)), "-ORGY", _num(rng.uniform(0, ns))]
    elif r < 0.35:
        a += ["-Xclose", _num(rng.uniform(0, nf * pixel)), "-Yclose", _num(rng.uniform(0, ns * pixel))]
    for rot in ("-detector_rotx", "-detector_roty", "-detector_rotz"):
        if rng.random() < 0.15:
            a += [rot, _num(rng.uniform(-10, 10))]
    if rng.random() < 0.15:
        a += ["-twotheta", _num(rng.uniform(-20, 30))]
        if rng.random() < 0.3:
            a += ["-twotheta_axis"] + rng.choice([["0", "1", "0"], ["0", "0", "-1"], ["1", "0", "0"]])
    if rng.random() < 0.2:
        a += ["-detector_thick", _num(rng.uniform(10, 500))]
        if rng.random() < 0.6:
            a += [rng.choice(["-detector_abs", "-detector_absorb"]), _num(rng.uniform(10, 1000))]
        if rng.random() < 0.6:
            a += [rng.choice(["-thicksteps", "-detector_thicksteps"]), str(rng.randint(1, 4))]
    if rng.random() < 0.3:
        a += ["-oversample", str(rng.randint(1, 3))]
    for flag in ("-oversample_thick", "-oversample_polar", "-oversample_omega"):
        if rng.random() < 0.1:
            a += [flag]
    if rng.random() < 0.06:
        a += ["-curved_det", "1"]
    if rng.random() < 0.08:
        a += ["-point_pixel"]
    if rng.random() < 0.1:
        a += ["-roi", str(rng.randint(0, nf // 2)), str(rng.randint(nf // 2, nf - 1)),
              str(rng.randint(0, ns // 2)), str(rng.randint(ns // 2, ns - 1))]
    return a


def smv_input(rng: random.Random) -> tuple:
    """(flag, file name, bytes) of a random SMV file for ``-mask`` or ``-img``: a header with some of
    the keys whose values C takes as defaults (pixel size, distances, wavelength, beam centre, ORGX/Y,
    φ, oscillation, two-theta) and, for a mask, about one pixel in ten 0."""
    import numpy as np
    flag, name = rng.choice([("-mask", "mask.img"), ("-img", "in.img")])
    nf, ns = rng.randint(24, 64), rng.randint(24, 64)
    px = rng.uniform(0.1, 0.5)
    keys = [("SIZE1", str(nf)), ("SIZE2", str(ns))]
    for key, p, draw in (("PIXEL_SIZE", 0.7, lambda: _num(px)),
                         ("DISTANCE", 0.6, lambda: _num(rng.uniform(50, 200))),
                         ("CLOSE_DISTANCE", 0.2, lambda: _num(rng.uniform(50, 200))),
                         ("WAVELENGTH", 0.5, lambda: _num(rng.uniform(0.7, 1.8))),
                         ("BEAM_CENTER_X", 0.5, lambda: _num(rng.uniform(0, nf * px))),
                         ("BEAM_CENTER_Y", 0.5, lambda: _num(rng.uniform(0, ns * px))),
                         ("ORGX", 0.2, lambda: _num(rng.uniform(0, nf))),
                         ("ORGY", 0.2, lambda: _num(rng.uniform(0, ns))),
                         ("PHI", 0.2, lambda: _num(rng.uniform(-10, 10))),
                         ("OSC_RANGE", 0.2, lambda: _num(rng.uniform(0, 2))),
                         ("TWOTHETA", 0.1, lambda: _num(rng.uniform(-10, 10)))):
        if rng.random() < p:
            keys.append((key, draw()))
    text = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
            + "".join(f"{k}={v};\n" for k, v in keys) + "}\f").encode()
    gen = np.random.default_rng(rng.randint(0, 2 ** 31))
    data = (gen.random((ns, nf)) >= 0.1) if flag == "-mask" else gen.integers(0, 1000, (ns, nf))
    return flag, name, text.ljust(512, b" ") + data.astype("<u2").tobytes()


def combo(rng: random.Random, files: dict = None) -> list:
    """One random nanoBragg command line (a list of arguments, no output flags). ``files``: a dict
    that receives the input files the line names beyond the golden set's (name -> bytes); without
    it no such file is named."""
    a = _crystal(rng, files) + _beam(rng) + _detector(rng)
    if files is not None and rng.random() < 0.12:
        flag, name, data = smv_input(rng)
        files[name] = data
        # the header's size, not the drawn one: always for a mask (C indexes the mask's pixels with
        # the detector's; nbsim refuses a mask of another size), mostly for an image
        if flag == "-mask" or rng.random() < 0.7:
            a = _without(a, {"-detpixels": 1, "-detpixels_f": 1, "-detpixels_s": 1, "-roi": 4})
        a = [flag, name] + a
    if rng.random() < 0.1:
        a += ["-dmin", _num(rng.uniform(1, 8))]
    if rng.random() < 0.1:
        a += ["-water", _num(rng.uniform(1, 100))]
    if rng.random() < 0.05:
        a += ["-adc", _num(rng.uniform(0, 100))]
    if rng.random() < 0.05:
        a += ["-scale", _num(rng.uniform(0.1, 10))]
    if rng.random() < 0.05:
        a += ["-coherent"]
    if rng.random() < 0.05:
        a += ["-density", _num(rng.uniform(0.5, 2)), "-MW", _num(rng.uniform(10, 40))]
    if rng.random() < 0.04:
        a += ["-detsize", _num(rng.uniform(5, 20))]
    return a


def _without(args: list, flags: dict) -> list:
    """``args`` without the given flags and their values (flag -> number of values)."""
    out, i = [], 0
    while i < len(args):
        if args[i] in flags:
            i += 1 + flags[args[i]]
        else:
            out.append(args[i])
            i += 1
    return out
