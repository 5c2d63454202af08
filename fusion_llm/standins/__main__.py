"""``python -m fusion_llm.standins [--force]``: build the four stand-ins into the cache and print a table."""

import sys

from fusion_llm.standins.configs import main

sys.exit(main())
