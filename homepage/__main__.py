import sys

from homepage.cli import main

sys.exit(main())
