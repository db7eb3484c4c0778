"""``python -m preprocess.synthetic OUT``: a synthetic cohort in the CHAOS layout (see :mod:`dlseg.synthetic`)."""

import sys

from dlseg.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
