"""`make bench`: torchcvt against transformers' CvT; same as `torchcvt bench` (logic in torchcvt.bench)."""

import sys

from torchcvt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
