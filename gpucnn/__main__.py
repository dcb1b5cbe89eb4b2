"""``python -m gpucnn ...``: the same as the ``gpucnn`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
