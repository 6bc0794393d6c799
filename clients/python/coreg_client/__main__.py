"""`python -m coreg_client`: see `coreg_client.cli`."""

import sys

from coreg_client.cli import main

sys.exit(main())
