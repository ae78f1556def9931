import sys

from hpc_dualbatch.cli import main

sys.exit(main())
