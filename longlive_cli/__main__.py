"""`python -m longlive_cli ...` runs the app from the repo root without installing."""

import sys

from longlive_cli.app import main

sys.exit(main())
