"""``python -m nbsim``: the Hydra app (see ``pipeline/app.py`` and ``conf/``). Idle OpenMP threads
sleep instead of spinning, freed tensors are reused instead of unmapped, and a successful run ends
without the interpreter's teardown (``pipeline.proc``: measured costs on a shared 2-core machine); a
multirun forks its render process first (``pipeline.prestart``)."""
import sys


def main() -> None:
    from pipeline.proc import exit_now, prepare_process
    prepare_process()                             # before torch is imported
    from pipeline import prestart
    if prestart.wanted(sys.argv[1:]):
        prestart.start()                          # a multirun: torch loads there while Hydra starts here
    from pipeline.app import main as app_main
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "nbsim"                     # so usage lines read "nbsim ...", not "__main__.py"
    app_main()
    exit_now(0, exit_handlers=True)               # done: skip the interpreter's teardown


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                     # Ctrl-C before the app's own handling is in place
        print("nbsim: interrupted", file=sys.stderr)
        sys.exit(130)
