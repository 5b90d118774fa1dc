"""``python -m nbsim.refine``: the refinement app (see ``pipeline/refine.py`` and ``conf/refine.yaml``)."""
import sys


def main() -> None:
    from pipeline.refine import main as app_main
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        sys.argv[0] = "nbsim.refine"
    app_main()


if __name__ == "__main__":
    main()
