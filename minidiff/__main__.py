import sys

from minidiff.cli import main

sys.exit(main())
