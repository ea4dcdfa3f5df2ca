"""Read pickled PyTorch checkpoints without running code from the file.

A pickle names the classes and functions it wants called to rebuild its objects. Here only
tensors, storages and plain containers are rebuilt (the globals PyTorch's own `weights_only`
loader allows); every other class or function the file names becomes an `Inert` stand-in
that records the arguments and state it was given, as plain data, and runs none of that
class's code. So a checkpoint's tensors load while, say, the OmegaConf config inside the
official GLIGEN releases stays an inert record.

This module is itself the `pickle_module` given to `torch.load` (it has `Unpickler` and `load`).
"""

from __future__ import annotations

import _compat_pickle
import functools
import os
import pickle
import sys
import zipfile
from typing import Any, Iterator

import torch

from gligen.errors import UserError


class Inert:
    """Stands for an object the pickle wanted built by the class or function `qualname`.

    `args`/`kwargs` are what it would have been called with, `state` what its `__setstate__`
    would have got, `items` the list or dict items the pickle appended; nothing else happens.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values) -> None:
        self.items.extend(values)

    def __call__(self, *args, **kwargs) -> Inert:
        # a stand-in that gets called (a pickled callable returned by another call) records that call too
        return inert_class(self.qualname, "__call__")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


@functools.lru_cache(maxsize=None)
def inert_class(module: str, name: str) -> type[Inert]:
    """The `Inert` subclass standing for global `module.name` (a class, so that pickle's NEWOBJ works on it)."""
    return type(name, (Inert,), {"qualname": f"{module}.{name}", "__module__": __name__})


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict[str, Any]:
    # PyTorch's own allow-list for `weights_only` loading: tensor rebuild functions, storages,
    # dtypes, OrderedDict, Size, device. Private API, hence looked up in one place.
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


def _inert_getattr(obj: Any, name: str) -> Any:
    """pickle's way to name a nested global (`getattr(Class, "method")`), resolved to a stand-in."""
    if isinstance(obj, type) and issubclass(obj, Inert):
        return inert_class(obj.qualname, name)
    return inert_class("builtins.getattr", name)(obj, name)


class Unpickler(pickle.Unpickler):
    """A pickle reader that resolves only allowed globals; any other becomes an `Inert` class."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) use Python 2 names such as __builtin__.set
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("builtins", "getattr"):
            return _inert_getattr
        allowed = _allowed_globals().get(f"{module}.{name}")
        return allowed if allowed is not None else inert_class(module, name)


def load(file, **kwargs) -> Any:
    """`pickle.load` with the restricted `Unpickler` (torch.load calls this for legacy-format headers)."""
    return Unpickler(file, **kwargs).load()


def inert_objects(obj: Any, where: str = "") -> Iterator[tuple[str, Inert]]:
    """Every `Inert` inside nested dicts/lists/tuples of `obj`, with its key path (e.g. "model/conv.weight")."""
    if isinstance(obj, Inert):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from inert_objects(value, f"{where}/{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from inert_objects(value, f"{where}/{i}" if where else str(i))


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """A `torch.save`d file, on the CPU, read without running code from it (unless `trust_pickle`).

    Raises a UserError when the file is not a PyTorch checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    is_zip = zipfile.is_zipfile(path)
    pickle_module = pickle if trust_pickle else sys.modules[__name__]
    try:
        # mmap keeps multi-GB releases out of RAM until their tensors are used (zip format only)
        return torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False, mmap=is_zip)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, IndexError) as error:
        raise UserError(f"{path}: not a PyTorch checkpoint ({_first_line(error)})") from None
    except (ImportError, AttributeError) as error:  # only when trusted: the file's classes are not importable
        raise UserError(f"{path}: cannot rebuild the pickled objects ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
