#!/usr/bin/env python
"""Compress a model with a recipe: ``python scripts/compress.py recipe=NAME [key.sub=value ...]``.

Recipes live in ``recipes/NAME.yaml``; no recipe means the embedded default. Writes
``out_dir/report.json`` and ``out_dir/recipe.yaml``. User errors print one line and exit 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcomp.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
