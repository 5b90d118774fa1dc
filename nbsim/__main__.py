"""``python -m nbsim``: the Hydra app (see ``pipeline/app.py`` and ``conf/``). Idle OpenMP threads
sleep instead of spinning, freed tensors are reused instead of unmapped, and a successful run ends
without the interpreter's teardown (``pipeline.proc``: measured costs on a shared 2-core machine)."""
import sys


def main() -> None:
    from pipeline.proc import exit_now, prepare_process
    prepare_process()                             # before torch is imported
    from pipeline.app import main as app_main
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "nbsim"                     # so usage lines read "nbsim ...", not "__main__.py"
    app_main()
    exit_now(0)                                   # done: skip the interpreter's teardown


if __name__ == "__main__":
    main()
