"""``python -m dlseg.synthetic OUT_DIR --patients N …`` (the same as ``python -m preprocess.synthetic``)."""

import sys

from dlseg.synthetic.cli import main

sys.exit(main())
