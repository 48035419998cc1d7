"""``python -m placerank``: the command line, so ``torchrun --nproc-per-node N -m placerank extract
...`` starts one placerank per rank (see docs/pipeline.md, "Several processes / machines")."""

import sys

from placerank.cli import main

if __name__ == "__main__":
    sys.exit(main())
