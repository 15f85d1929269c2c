"""The hivemind workarounds refuse to run on a hivemind they were not written for."""

from __future__ import annotations

import hivemind
import pytest

from hivetrain.hivemind_compat import HIVEMIND_VERSION, check_hivemind


def test_the_installed_hivemind_is_the_one_the_workarounds_were_written_for():
    assert hivemind.__version__ == HIVEMIND_VERSION
    check_hivemind()


def test_another_hivemind_release_is_refused_with_the_fix():
    with pytest.raises(ImportError, match=rf"written for hivemind {HIVEMIND_VERSION}, found 1\.2\.0: install hivemind=="):
        check_hivemind("1.2.0")
