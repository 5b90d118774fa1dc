"""Hydra config -> (ExperimentSpec, DeviceSpec), and one-line messages for every config error.

* ``NbsimConfig`` is the typed schema of the whole app config (registered in Hydra's ConfigStore as
  ``nbsim_schema``; ``conf/config.yaml`` lists it first in its defaults), so a wrong type or an unknown
  key fails while Hydra composes.
* ``cfg_to_spec(cfg)`` builds and validates the spec dataclasses.
* ``compose_config(overrides)`` / ``compose_spec(overrides)`` do the same through Hydra's compose API
  (tests, sweeps, other tools), without running the app.
* ``format_error(exc)`` turns any error of the above into one line naming the key.
* The OmegaConf resolver ``${nbsim_data:NAME}`` gives the absolute path of an example input shipped in
  ``nbsim/data/`` (so configs work from any working directory).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nbsim.spec import (DTYPES, BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec,
                        ImageSpec, SpecError, compile_mode, spec_from_dict)


# The default multirun launcher (conf/config.yaml: hydra/launcher=nbsim_batch) registers its config
# with this import: Hydra's plugin discovery walks the ``hydra_plugins`` namespace on disk, which the
# import hook of an editable install (the README's ``pip install -e``) does not list, so from any
# folder but the checkout's root the option would be missing.
from hydra_plugins.nbsim_launcher.nbsim_launcher import NbsimBatchLauncher, NbsimSweeper  # noqa: E402


def _register_launcher() -> None:
    """Make the in-process launcher and nbsim's sweeper known Hydra plugins where Hydra's scan does
    not see them (an editable install run outside the checkout's root); a no-op where the scan found them."""
    from hydra.core.plugins import Plugins
    for cls in (NbsimBatchLauncher, NbsimSweeper):
        Plugins.instance().class_name_to_class.setdefault(f"{cls.__module__}.{cls.__name__}", cls)


_register_launcher()


def _conf_dir() -> Path:
    """The Hydra app's config folder: ``nbsim/conf/`` in an installed wheel (pyproject.toml ships the
    top-level ``conf/`` there), else ``conf/`` of the checkout this module lies in."""
    import nbsim
    packaged = Path(nbsim.__file__).resolve().parent / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


CONF_DIR = _conf_dir()
DATA_DIR = Path(__import__("nbsim").__file__).resolve().parent / "data"
PREVIEW_MODES = ("log", "percentile")


@dataclass
class StoreConfig:
    root: str = "outputs"          # folder of the entries <root>/<config hash>/; relative to the start folder
    force: bool = False            # true: recompute even if the entry exists
    write_noise: bool = False      # also write noise.img (Poisson SMV; added to a stored entry)
    write_pgm: bool = False        # also write image.pgm (nanoBragg's 8-bit PGM; added to a stored entry)
    preview: str = "log"           # preview.png scaling: log | percentile
    formats: List[str] = field(default_factory=lambda: ["smv"])  # besides float.bin: smv | cbf | nexus
    nexus_dtype: str = "float32"   # NeXus data: float32 (the float image) | int32 (counts, as in the CBF)
    nexus_compression: str = "none"  # NeXus data compression: none | bslz4 (bitshuffle/LZ4, hdf5plugin)


@dataclass
class NbsimConfig:
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    beam: BeamSpec = field(default_factory=BeamSpec)
    crystal: CrystalSpec = field(default_factory=CrystalSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    quirks: str = "faithful"       # faithful (bit-for-bit nanoBragg C) | physical (every quirk fixed)
    fix: List[str] = field(default_factory=list)   # quirks to fix on top of the preset (README: Quirks)
    device: DeviceSpec = field(default_factory=DeviceSpec)
    store: StoreConfig = field(default_factory=StoreConfig)
    quiet: bool = False            # true: stderr shows only errors (no progress bar, no summary line)


def _nbsim_data(name: str) -> str:
    return str(DATA_DIR / name)


def register() -> None:
    """Register the schema and the ``nbsim_data`` resolver (idempotent)."""
    ConfigStore.instance().store(name="nbsim_schema", node=NbsimConfig)
    if not OmegaConf.has_resolver("nbsim_data"):
        OmegaConf.register_new_resolver("nbsim_data", _nbsim_data)
    if not OmegaConf.has_resolver("nbsim_keys_help"):
        from pipeline.keyhelp import _resolver
        OmegaConf.register_new_resolver("nbsim_keys_help", _resolver)


register()


# ---------------------------------------------------------------------------------------------
# config -> spec
# ---------------------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def validate_device(dev: DeviceSpec) -> DeviceSpec:
    """Static checks of the device section (availability is checked when simulating)."""
    if not isinstance(dev.device, str) or not _DEVICE_RE.match(dev.device):
        raise SpecError("device.device", f"must be cpu, cuda, cuda:N or mps; got {dev.device!r}")
    if dev.dtype not in DTYPES:
        raise SpecError("device.dtype", f"must be one of {', '.join(DTYPES)}; got {dev.dtype!r}")
    mb = dev.memory_budget_mb
    if mb is not None and not mb > 0:
        raise SpecError("device.memory_budget_mb", f"must be > 0 (or null: automatic), got {mb!r}")
    t = dev.time_limit_s
    if t is not None and not t > 0:
        raise SpecError("device.time_limit_s", f"must be > 0 (or null: no limit), got {t!r}")
    compile_mode(dev.compile)
    return dev


def validate_store(store) -> None:
    if store.preview not in PREVIEW_MODES:
        raise SpecError("store.preview",
                        f"must be one of {', '.join(PREVIEW_MODES)}; got {store.preview!r}")
    if not str(store.root):
        raise SpecError("store.root", "must be a folder path, got ''")
    from nbsim.io.nexus import COMPRESSIONS, NEXUS_DTYPES
    from pipeline.store import FORMATS
    bad = [f for f in store.get("formats", ["smv"]) if f not in FORMATS]
    if bad:
        raise SpecError("store.formats", f"unknown format {bad[0]!r}; accepted: {', '.join(FORMATS)}")
    if store.get("nexus_dtype", "float32") not in NEXUS_DTYPES:
        raise SpecError("store.nexus_dtype", f"must be one of {', '.join(NEXUS_DTYPES)}; "
                        f"got {store.nexus_dtype!r}")
    if store.get("nexus_compression", "none") not in COMPRESSIONS:
        raise SpecError("store.nexus_compression", f"must be one of {', '.join(COMPRESSIONS)}; "
                        f"got {store.nexus_compression!r}")


def cfg_to_spec(cfg: DictConfig) -> Tuple[ExperimentSpec, DeviceSpec]:
    """Build and validate ``(ExperimentSpec, DeviceSpec)`` from a composed app config."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    data.pop("hydra", None)
    allowed = [f.name for f in fields(NbsimConfig)]
    for key in data:
        if key not in allowed:
            raise SpecError(key, f"unknown key; accepted top-level keys: {', '.join(allowed)}")
    spec = spec_from_dict({k: data[k] for k in ("detector", "beam", "crystal", "image", "quirks", "fix")})
    spec.validate()
    dev_keys = {f.name for f in fields(DeviceSpec)}
    device = DeviceSpec(**{k: v for k, v in data.get("device", {}).items() if k in dev_keys})
    validate_device(device)
    if "store" in data:
        validate_store(OmegaConf.create(data["store"]))
    return spec, device


def compose_config(overrides: Iterable[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` (Hydra command-line syntax) via the compose API.

    Works whether or not a Hydra app is already running in this process (its state is restored).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="nbsim"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def compose_spec(overrides: Iterable[str] = ()) -> Tuple[ExperimentSpec, DeviceSpec]:
    """``cfg_to_spec(compose_config(overrides))``: a validated spec for the given overrides."""
    return cfg_to_spec(compose_config(overrides))


# ---------------------------------------------------------------------------------------------
# errors -> one line
# ---------------------------------------------------------------------------------------------

_SECTIONS = {"detector": DetectorSpec, "beam": BeamSpec, "crystal": CrystalSpec, "image": ImageSpec,
             "device": DeviceSpec, "store": StoreConfig}


def _accepted_keys(section: str) -> Optional[list]:
    cls = _SECTIONS.get(section)
    return [f.name for f in fields(cls)] if cls else None


def _field_type(full_key: str) -> Optional[str]:
    """The declared type of ``section.key`` as written in the dataclass, e.g. 'Optional[int]'.

    For a list element (``crystal.misset_deg[2]``) the element type."""
    parts = full_key.split(".")
    if len(parts) >= 2 and parts[0] in _SECTIONS:
        name, indexed = re.subn(r"\[.*$", "", parts[1])
        for f in fields(_SECTIONS[parts[0]]):
            if f.name == name:
                t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                m = re.search(r"List\[(\w+)\]", t)
                return m.group(1) if (indexed and m) else t
    if full_key == "quirks":
        return "str"
    if full_key == "quiet":
        return "bool"
    if full_key == "fix" or full_key.startswith("fix["):
        return "List[str]" if full_key == "fix" else "str"
    return None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "List[float]": "a list of numbers like [1, 2, 3]", "List[int]": "a list of integers",
               "List[str]": "a list of quirk names like [phi0_carryover]"}


_KEY_WORDS = {"store.formats": "a list of formats like [smv, cbf, nexus]"}


def _expected(type_str: str, key: str = "") -> str:
    if key in _KEY_WORDS:
        return _KEY_WORDS[key]
    m = re.fullmatch(r"Optional\[(.*)\]", type_str)
    inner = m.group(1) if m else type_str
    word = _TYPE_WORDS.get(inner, inner)
    return word + (" or null" if m else "")


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return str(text).strip()


def _unknown_key_message(full_key: str) -> str:
    parts = full_key.split(".")
    if len(parts) >= 2 and _accepted_keys(parts[0]):
        keys = _accepted_keys(parts[0])
        close = difflib.get_close_matches(parts[1], keys, n=3)
        hint = f" (did you mean {' or '.join(parts[0] + '.' + c for c in close)}?)" if close else ""
        return f"{full_key}: unknown key{hint}; accepted keys of {parts[0]}: {', '.join(keys)}"
    top = [f.name for f in fields(NbsimConfig)]
    return f"{full_key}: unknown key; accepted top-level keys: {', '.join(top)}"


def format_error(exc: BaseException, fallback: bool = False) -> Optional[str]:
    """One line describing a configuration error, or None if ``exc`` is not one (a real bug).

    ``fallback``: describe any exception by the first line of its message (for errors raised while
    Hydra composes the command line)."""
    from hydra.errors import (ConfigCompositionException, MissingConfigException,
                              OverrideParseException)
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, OmegaConfBaseException,
                                  ValidationError)

    from nbsim.io.inputs import InputFileError
    if isinstance(exc, (SpecError, InputFileError)):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^']*)'", str(exc))
        what = m.group(1) if m else _first_line(exc)
        group = getattr(exc, "config_name", None) or what
        opts = getattr(exc, "options", None)
        if opts and "/" in what:
            grp, name = what.rsplit("/", 1)
            return f"{grp}={name}: no such option; available: {', '.join(sorted(opts))}"
        line = _first_line(exc)
        return line if line.startswith(f"{group}") else f"{group}: {line}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override {exc.override!r}: {_first_line(exc.message)}"

    # Hydra wraps OmegaConf's error ("Error merging override crystal.N=abc"): the cause names the key
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        msg = getattr(cause, "msg", None) or _first_line(cause)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in" in msg:
            from nbsim.spec import PanelSpec
            if getattr(cause, "object_type", None) is PanelSpec:      # inside the detector.panels list
                return (f"detector.panels: {key.rsplit('.', 1)[-1]}: unknown panel key; accepted: "
                        + ", ".join(f.name for f in fields(PanelSpec)))
            return _unknown_key_message(key)
        from nbsim.spec import PanelSpec
        if getattr(cause, "object_type", None) is PanelSpec:
            return f"detector.panels: {key.rsplit('.', 1)[-1]}: {_first_line(msg)}"
        if isinstance(cause, ValidationError) and _field_type(key):
            return f"{key}: must be {_expected(_field_type(key), key)}, got {getattr(cause, 'value', None)!r}"
        return f"{key or 'config'}: {_first_line(msg)}"
    if isinstance(exc, ConfigCompositionException):
        m = re.search(r"Could not override '([^']*)'", str(exc))
        return _unknown_key_message(m.group(1)) if m else _first_line(exc)
    if fallback:
        line = _first_line(exc) or type(exc).__name__
        if "Config group override" in line:
            line += " (to drop an optional group such as pivot, write ~pivot)"
        return line
    return None
