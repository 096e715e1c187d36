"""``python -m pcfast`` is the ``pcfast`` command."""
import sys

from .cli import main

sys.exit(main())
