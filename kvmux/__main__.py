import sys

from kvmux.cli.main import main

sys.exit(main())
