"""Session hooks. The upgrade demo's first run (one thread, a few minutes) starts as soon as its tests
are selected, and its tests run last, so that it runs beside the other tests on the second core."""

import shutil
import sys

import pytest


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Start the demo now and move its tests last, so that the others run while it does."""
    demo = [item for item in items if item.nodeid.startswith("tests/cli/test_demo_upgrade.py")]
    if demo:
        demo[0].module.start_early()
        items[:] = [item for item in items if item not in demo] + demo


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A demo run still going (its tests never ran: -x stopped earlier) is stopped and removed."""
    module = sys.modules.get("tests.cli.test_demo_upgrade")
    early = getattr(module, "_EARLY", None)
    if early and early["proc"].poll() is None:
        early["proc"].kill()
        early["proc"].wait()
        shutil.rmtree(early["root"], ignore_errors=True)
