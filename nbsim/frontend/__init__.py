"""nanoBragg-compatible command-line front end: argv <-> ExperimentSpec."""
from .argv import (FLAGS, Flag, FrontendError, OutputFiles, Parsed, lookup_flag, parse_argv,  # noqa: F401
                   spec_error_message, usage)
from .to_argv import spec_to_argv  # noqa: F401

__all__ = ["FLAGS", "Flag", "FrontendError", "OutputFiles", "Parsed", "lookup_flag", "parse_argv",
           "spec_error_message", "spec_to_argv", "usage"]
