"""`python -m vramsupply` and the `vramsupply` command: import the command line, then run it.

Importing it takes about half a second. Ctrl-C in that window exits quietly with 130 (as it does
at any later moment) instead of a KeyboardInterrupt traceback from the middle of an import.
"""

import sys


def run() -> None:
    try:
        from vramsupply.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
