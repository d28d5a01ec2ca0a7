import sys
from pathlib import Path

# Tests import `wenlan` and `data_tools` from the checkout, however pytest is launched.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    # wenlan.data.transforms uses torchvision's JPEG decoder (pinned 0.29), which warns on every call that
    # TorchCodec supersedes it; the library filters that warning, but pytest resets filters per test.
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
