import sys

from vlm.cli import main

sys.exit(main())
