"""The real-size tier is opt-in: ``pytest tests/realsize -s --run-realsize`` (or ``ACESTEP_REALSIZE=1``)."""

import os


def pytest_addoption(parser):
    parser.addoption("--run-realsize", action="store_true", default=False,
                     help="run the real-size tier (random weights at full released size; needs ~12 GB RAM for 2B, "
                          "more for XL and for full fine-tuning)")


def pytest_configure(config):
    config.addinivalue_line("markers", "realsize: full released-size models (opt-in: --run-realsize or "
                                       "ACESTEP_REALSIZE=1; not run by default or in CI)")
    if config.getoption("--run-realsize", default=False):
        os.environ["ACESTEP_REALSIZE"] = "1"
