"""Run a hook on a module once it is imported (now, if it already is), without importing it early:
how the test hooks reach a launched job without code in the package."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Callable


class _HookOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, hook: Callable[[ModuleType], None]):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        execute = spec.loader.exec_module

        def execute_then_hook(module: ModuleType) -> None:
            execute(module)
            self.hook(module)
        spec.loader.exec_module = execute_then_hook
        return spec


def after_import(name: str, hook: Callable[[ModuleType], None]) -> None:
    if name in sys.modules:
        hook(sys.modules[name])
    else:
        sys.meta_path.insert(0, _HookOnImport(name, hook))
