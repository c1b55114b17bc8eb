import sys

from occlab.cli import main

sys.exit(main())
