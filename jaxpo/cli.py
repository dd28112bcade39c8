"""The `jaxpo` command.

    jaxpo train --config=configs/dpo_tiny.py --config.train.steps=200
"""

import sys

import jaxpo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(f"jaxpo {jaxpo.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
