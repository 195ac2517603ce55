"""Puts tests/ on sys.path, so that a test module in any folder imports the helpers kept here
(`from host_random import prism_inputs`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
