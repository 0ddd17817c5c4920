"""``python -m equireg`` (how the Slicer module launches the engine: PythonSlicer -m equireg)."""

import sys

from .cli import main

sys.exit(main())
