"""`python -m partrain`: the same as the `partrain` command."""
import sys

from .entry import main

sys.exit(main())
