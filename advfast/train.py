"""``python -m advfast.train ...`` is ``advfast-train ...``."""

import sys

from advfast.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
