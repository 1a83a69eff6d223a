"""`python -m benchmarks.zoo`: see `benchmarks/zoo/run.py`."""

import sys

from benchmarks.zoo.run import main

sys.exit(main())
