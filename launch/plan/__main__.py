"""Runs the memory planner: ``python -m tritower.launch.plan --help``."""

import sys

from tritower.launch.plan.command import main

sys.exit(main())
