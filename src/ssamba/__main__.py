"""`python -m ssamba` runs the command line (also what `torchrun -m ssamba ...` starts)."""

import sys

from ssamba.cli import main

sys.exit(main())
