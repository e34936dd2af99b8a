import os
import sys

# Tests import the top-level modules (vit.py, llm.py, ...) straight from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
