"""``python -m dlseg.bench [loader|augment|preprocess|predict|train|all]``: see :mod:`dlseg.benchmarks.cli`.

Nothing is imported unless this runs as the program: the benchmark's spawned workers re-import their parent's
main module, and each would otherwise load torch before it measures anything.
"""

import sys

if __name__ == "__main__":
    from dlseg.benchmarks.cli import main

    sys.exit(main())
