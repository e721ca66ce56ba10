import sys

from stgc.cli import main

sys.exit(main())
