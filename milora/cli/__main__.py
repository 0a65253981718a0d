"""`python -m milora.cli ...` (what the flow and torchrun launch)."""

import sys

from milora.cli import main

sys.exit(main())
