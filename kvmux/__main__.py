import sys

from kvmux.cli import main

sys.exit(main())
