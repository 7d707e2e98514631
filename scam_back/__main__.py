"""python -m scam_back: the scam-back command."""

import sys

from .cli import main

sys.exit(main())
