import sys
from pathlib import Path

# Tests import `wenlan` and `data_tools` from the checkout, however pytest is launched.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
