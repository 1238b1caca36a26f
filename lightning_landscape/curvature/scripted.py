"""TorchScript inside a module: where the ``torch.func`` product kinds would be silently wrong.

Once the TorchScript JIT has optimized a scripted function or module (after its profiling
runs, so in any real fit), ``torch.func``'s transforms through it are wrong without an error:
its differentiable subgraphs drop forward-mode tangents, and reverse-over-reverse through them
is off too. Measured in torch 2.13 on small MLPs: ``hvp="func"`` products 48-100 % off,
``hvp="compiled"`` 37-65 % off, ``vjp(grad(f))`` 40-58 % off; ``torch.jit.optimized_execution(
False)`` does not help once the plan is cached. Double backward through TorchScript is right
(3e-16), so :func:`torchscript_in` lets the ``func`` kinds refuse such modules and ``"auto"``
take a graph kind.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator

import torch
from torch import nn

_ScriptFunction = torch.jit.ScriptFunction
_by_class: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions defined in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _named_in(fn: object) -> str | None:
    """A scripted function ``fn`` names: a global (``swish(x)``), or an attribute of a module
    it names as a global (``act.swish(x)``); named is enough, called or not."""
    fn = getattr(fn, "__func__", fn)  # staticmethod, classmethod, bound method
    code, namespace = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or namespace is None:
        return None
    names = {n for c in _codes(code) for n in c.co_names}
    for name in names:
        value = namespace.get(name)
        if isinstance(value, _ScriptFunction):
            return name
        if isinstance(value, types.ModuleType):
            for attr in names:
                if isinstance(getattr(value, attr, None), _ScriptFunction):
                    return f"{name}.{attr}"
    return None


def _in_class(cls: type) -> str | None:
    """A scripted function a class of ``cls``'s MRO (below ``nn.Module``) holds or names."""
    if cls not in _by_class:
        found = None
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            for attr, value in vars(klass).items():
                name = attr if isinstance(value, _ScriptFunction) else _named_in(value)
                if name is not None:
                    found = f"the scripted function {name!r} (in {klass.__name__}.{attr})"
                    break
            if found:
                break
        _by_class[cls] = found
    return _by_class[cls]


def torchscript_in(module: nn.Module) -> str | None:
    """Where ``module`` runs TorchScript, or None: a scripted submodule; a scripted function
    one of its modules holds, or its classes (their MRO up to ``nn.Module``) hold or name in a
    method (as a global or an attribute of a global module, in nested functions too); a
    function stored on a module instance (a replaced ``forward``) that names one.

    Not seen: a scripted function reached through a plain helper function or another object.
    A name that only looks like one (an attribute ``self.swish`` beside a scripted global
    ``swish``) is taken for one: the graph kinds are then used, correct but slower.
    """
    for name, m in module.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            return f"the scripted submodule {name or type(m).__name__!r}"
        for attr, value in vars(m).items():
            if isinstance(value, _ScriptFunction):
                return f"the scripted function {type(m).__name__}.{attr}"
            if isinstance(value, types.FunctionType | types.MethodType):
                named = _named_in(value)
                if named is not None:
                    return f"the scripted function {named!r} (in {type(m).__name__}.{attr})"
        found = _in_class(type(m))
        if found:
            return found
    return None


def refusal(module: nn.Module | None) -> str | None:
    """Why the ``torch.func`` product kinds refuse ``module`` (:func:`torchscript_in`), or None;
    taken once per operator (the scan walks every module)."""
    scripted = None if module is None else torchscript_in(module)
    if scripted is None:
        return None
    return (
        f"torch.func through TorchScript is wrong once the JIT has optimized it (silently: see "
        f"curvature/scripted.py): {scripted}; use the 'double_backward' or 'cached' products "
        "('auto' does)."
    )
