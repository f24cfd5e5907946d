"""`python -m ddim_inversion_cli`: the `ddim-invert` command."""

import sys

from ddim_inversion_cli.main import main

sys.exit(main())
