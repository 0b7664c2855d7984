"""The benchmark tests: ``study_checks`` (shared helpers) imports from every subfolder."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
