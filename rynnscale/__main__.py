import sys

from rynnscale.cli import main

sys.exit(main())
