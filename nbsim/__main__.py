"""``python -m nbsim``: the Hydra app (see ``pipeline/app.py`` and ``conf/``)."""
import sys


def main() -> None:
    from pipeline.app import main as app_main
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "nbsim"                     # so usage lines read "nbsim ...", not "__main__.py"
    app_main()


if __name__ == "__main__":
    main()
