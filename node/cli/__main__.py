"""``python -m node.cli`` = ``dicom-node``."""

import sys

from node.cli import main

sys.exit(main())
