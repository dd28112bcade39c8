"""``python -m jaxpo.train [flags]`` is ``jaxpo train [flags]``."""

import sys

from jaxpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
