"""The nanoBragg quirks nbsim reproduces, each with a stable name: the single table they come from.

``QUIRKS`` is the one source of truth. The spec's validation (``quirks`` preset + ``fix`` list), the
Hydra schema's accepted values, the front end's ``--fix`` help, the quirk warnings' names and the
README's "Quirks" list (``readme_list()``; a test checks the README against it) all derive from it.

A run's effective set of fixed quirks is its preset (``faithful``: none, ``physical``: all) plus the
names in ``fix``. Code asks ``q.fixed("phi0_carryover")``; an unknown name there is a bug (KeyError).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Iterable, Optional, Tuple


@dataclass(frozen=True)
class Quirk:
    """One C behaviour nbsim reproduces by default and can fix on its own.

    name: stable snake_case switch name. c: what the C program does. fixed: what nbsim does when the
    quirk is fixed. scope: ``"engine"`` (changes pixels, both entry points) or ``"command line"``
    (how the nanoBragg front end reads argv; nothing to fix in a Hydra config). upstream: the
    bl831/nanoBragg branch that fixes exactly this quirk (nbsim then equals a build of it)."""
    name: str
    c: str
    fixed: str
    scope: str = "engine"
    upstream: Optional[str] = None


QUIRKS: Tuple[Quirk, ...] = (
    Quirk("convention_pivot", "a detector convention other than CUSTOM forces its pivot "
          "(`detector.pivot` / `-pivot` is ignored)", "the configured pivot is honoured"),
    Quirk("convention_vectors", "a convention other than CUSTOM ignores explicit detector, beam, "
          "polarization and spindle vectors in the spec", "they are honoured"),
    Quirk("pix0_overwritten", "`pix0_vector_mm` / `-pix0_vector` is overwritten by the pivot formula",
          "it is honoured"),
    Quirk("ratio_ignores_twotheta", "the beam/detector-normal ratio that recomputes the distance "
          "ignores two-theta", "it includes two-theta"),
    Quirk("phi0_carryover", "a φ step of exactly 0 keeps the previous loop iteration's orientation",
          "that step uses the unrotated (φ = 0) crystal", upstream="fix/phi0-stale-rotation"),
    Quirk("triclinic_cstar", "`-cell` builds a wrong c* for triclinic cells",
          "textbook c* = V*/(a* b* sin γ*)"),
    Quirk("first_subpixel_factors", "solid angle and polarization come from the first sub-pixel "
          "(and first source) of each pixel", "applied per sub-pixel and source"),
    Quirk("last_layer_capture", "the capture fraction of the last sensor layer is applied to the "
          "whole pixel", "each layer weighted by its own capture fraction"),
    Quirk("oversample_compounding", "`-oversample_thick/_polar/_omega` multiply the running sum "
          "(earlier contributions are multiplied again and again)",
          "each contribution is multiplied by its own factor", upstream="fix/subpixel-oversampling"),
    Quirk("nopolar_oversample_polar", "`-nopolar` has no effect together with `-oversample_polar`",
          "`-nopolar` wins"),
    Quirk("water_fluence_squared", "the water background scales with fluence² (and is divided "
          "by the number of steps)", "linear in fluence, weighted like the crystal signal"),
    Quirk("source_intensity_ignored", "the source file's intensity column is ignored",
          "used as relative source weights"),
    Quirk("tricubic_global_off", "one out-of-range tricubic lookup switches interpolation off for "
          "the rest of the run", "nearest-neighbour fallback for that lookup only"),
    Quirk("thickness_layers", "N sensor layers sit at 0, T/(N−1), …, T and each adds its full "
          "intensity", "N layers of T/N"),
    Quirk("twotheta_axis_sets_twotheta", "`-twotheta_axis x y z` also reads as `-twotheta x` "
          "(and pivot sample)", "only sets the axis", scope="command line"),
    Quirk("misset_seed_reads_misset", "`-misset_seed N` also reads a misset from the three "
          "following words", "only sets the seed", scope="command line"),
    Quirk("fdump_from_cwd", "without `-hkl`, a `Fdump.bin` left in the working directory is read",
          "only read when named by `-dump`", scope="command line"),
    Quirk("curved_det_needs_value", "`-curved_det` as the last argument has no effect",
          "it switches the curved detector on", scope="command line"),
)

NAMES: Tuple[str, ...] = tuple(q.name for q in QUIRKS)
BY_NAME = {q.name: q for q in QUIRKS}
assert len(BY_NAME) == len(QUIRKS), "duplicate quirk name"
PRESETS = {"faithful": frozenset(), "physical": frozenset(NAMES)}
PRESET_NAMES: Tuple[str, ...] = tuple(PRESETS)


@dataclass(frozen=True)
class QuirkSet:
    """The effective set of fixed quirks of a run."""
    fixed_names: FrozenSet[str] = frozenset()

    def fixed(self, name: str) -> bool:
        """Whether quirk ``name`` is fixed (KeyError for a name not in ``QUIRKS``: a typo)."""
        if name not in BY_NAME:
            raise KeyError(f"unknown quirk {name!r}")
        return name in self.fixed_names

    def label(self):
        """``"faithful"``, ``"physical"``, or the sorted list of fixed names (config hash, info)."""
        for preset, names in PRESETS.items():
            if self.fixed_names == names:
                return preset
        return sorted(self.fixed_names)


def unknown(fix: Iterable[str]) -> Optional[str]:
    """The first name in ``fix`` that is not a quirk, or None."""
    for name in fix:
        if name not in BY_NAME:
            return name
    return None


def accepted_text() -> str:
    return ", ".join(NAMES)


def resolve(preset: str = "faithful", fix: Iterable[str] = ()) -> QuirkSet:
    """Effective set: the preset's fixed quirks plus ``fix`` (names assumed valid)."""
    return QuirkSet(frozenset(PRESETS[preset]) | frozenset(fix))


def of(spec) -> QuirkSet:
    """The effective ``QuirkSet`` of an ``ExperimentSpec`` (its ``quirks`` preset and ``fix``)."""
    return resolve(spec.quirks, getattr(spec, "fix", None) or ())


def readme_list() -> str:
    """The README's quirk list (markdown), generated from ``QUIRKS``."""
    lines = []
    for q in QUIRKS:
        up = f" — equals upstream branch `{q.upstream}`" if q.upstream else ""
        scope = " *(command line only)*" if q.scope != "engine" else ""
        lines.append(f"- `{q.name}`{scope}: {q.c} → {q.fixed}{up}.")
    return "\n".join(lines)


def help_text(width: int = 100) -> str:
    """The quirk names for the front end's ``--fix`` help, wrapped."""
    import textwrap
    return "\n".join(textwrap.wrap(accepted_text(), width))
