"""Python runs this at the start of every process a test launches: tests/conftest.py `child_env` puts
this folder first on PYTHONPATH. It installs the test hooks the package itself does not carry."""

import os

from install import install_hooks

install_hooks(os.environ)
