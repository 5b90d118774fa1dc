"""CrystFEL ``.geom`` texts of the test detectors, built in one place (the test files that read,
store or refine geometry files share these panels)."""
from __future__ import annotations

#: cos and sin of ~30 degrees, as written in the rotated panel's fs/ss lines
COS30, SIN30 = 0.866025, 0.5


def panel(name: str, fpixels: int, spixels: int, fs: str, ss: str, corner_x, corner_y) -> str:
    """The lines of one panel: pixel ranges from 0, fast/slow directions, corner (pixels)."""
    return (f"{name}/min_fs = 0\n{name}/max_fs = {fpixels - 1}\n{name}/min_ss = 0\n"
            f"{name}/max_ss = {spixels - 1}\n{name}/fs = {fs}\n{name}/ss = {ss}\n"
            f"{name}/corner_x = {corner_x}\n{name}/corner_y = {corner_y}\n")


def geom(*panels: str, res, clen, coffset, comment=None, header=()) -> str:
    """A whole file: an optional ``; comment`` line, ``header`` lines, res / clen / coffset, the panels."""
    lines = ([f"; {comment}"] if comment else []) + list(header) + [f"res = {res}", f"clen = {clen}",
                                                                       f"coffset = {coffset}"]
    return "\n".join(lines) + "\n" + "".join(panels)


#: a 16 x 12 panel rotated by ~30 degrees about the beam, 0.2 mm pixels at 61 mm
ROTATED_16x12 = panel("p0", 16, 12, f"+{COS30}x +{SIN30}y", f"-{SIN30}x +{COS30}y", -20, -7.5)
