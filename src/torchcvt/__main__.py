"""`python -m torchcvt`: the torchcvt command. Python imports the package (and torch) before this runs, so a
Ctrl-C that early is Python's own KeyboardInterrupt; the `torchcvt` script holds it (torchcvt_launcher)."""

from torchcvt_launcher import main

raise SystemExit(main())
