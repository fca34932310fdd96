import sys

from aevae.cli import main

sys.exit(main())
