import sys

from flora.cli import main

sys.exit(main())
