"""``python -m advfast.pseudo_labels``: the generator's command line (advfast.pseudo_labels.cli)."""

import sys

from advfast.pseudo_labels.cli import main

sys.exit(main())
