import sys

from dvlib.cli import main

sys.exit(main())
