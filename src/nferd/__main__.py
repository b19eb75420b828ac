"""``python -m nferd`` (also what ``torchrun -m nferd`` runs)."""

import sys

from .cli import main

sys.exit(main())
