import sys

from minintk.cli import main

sys.exit(main())
