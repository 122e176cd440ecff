"""The version string: one source of truth, PEP 440 shaped, exported by the package."""

import os
import re
import subprocess
import sys

import pytest

import ft_keras
from ft_keras import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_exported_and_well_formed():
    assert ft_keras.__version__ == version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", version.__version__)


def test_setup_reads_the_same_version():
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == version.__version__


def test_license_file_matches_the_declared_license():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        assert 'license="Apache-2.0"' in handle.read()
    with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as handle:
        text = handle.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_changelog_has_an_entry_for_this_version():
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as handle:
        text = handle.read()
    base = version.__version__.split(".dev")[0]
    assert re.search(rf"^## \[?{re.escape(base)}", text, re.M)


if __name__ == "__main__":  # bazel test / python tests/test_version.py
    sys.exit(pytest.main([__file__, "-q"]))
