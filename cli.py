"""Run the ``memstore`` command line from a checkout: ``python cli.py --help``.

The command itself lives in :mod:`memstore_gpt2.cli` (the installed ``memstore`` console script
points there), so that no top-level module called ``cli`` is installed to collide with a user's own.
"""

from memstore_gpt2.cli import main

if __name__ == "__main__":
    main()
