"""User errors: one message naming the key, file or value and the fix, printed once, exit code 2.

A *user error* is anything the person launching a run can fix (configuration, data, tokenizer,
checkpoint, run directory).  Code raises a subclass of ``UserError`` (``ConfigError`` lives in
``engram_train.config.schema``); every entry point (``engram-train``, each script in ``tools/``)
runs its body through ``run_main``, which prints ``error: <message>`` on stderr and exits with
``USER_ERROR_EXIT`` -- no traceback.  Hydra's and OmegaConf's errors while composing the user's
overrides count as user errors too (``describe``).  ``HYDRA_FULL_ERROR=1`` or
``ENGRAM_TRAIN_DEBUG=1`` re-raise with the full traceback instead.

Several ranks print the message once:

* before the process group exists every rank runs the same deterministic checks (composition,
  validation), so rank 0 alone prints; checks of a node's own files (run.dir, data.dir, data
  files, tokenizer) are reported by each node's local rank 0 too, naming the host, since another
  node's files may differ;
* afterwards the first rank to report claims a key in the process group's store (under torchrun
  the launcher holds it, so it outlives the ranks) and prints; the other ranks exit with the same
  code without a word -- also those whose collective broke because the reporting rank left, whose
  error is a consequence rather than a cause.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, TypeVar

USER_ERROR_EXIT = 2
DEBUG_ENV = "ENGRAM_TRAIN_DEBUG"
_STORE_KEY = "engram_train/user_error_reported"

T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix; the message names the key/file/value and the fix."""


class DataError(UserError, ValueError):
    """The training data (corpus files, prepared directory, tokenizer) cannot be used as given."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the configuration names does not exist."""


def debug_requested() -> bool:
    return any(os.environ.get(k, "").strip() not in ("", "0") for k in ("HYDRA_FULL_ERROR", DEBUG_ENV))


def describe(exc: BaseException) -> Optional[str]:
    """The one-line message of a user error, or None when ``exc`` is not one (a bug: keep its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    hydra_msg = _describe_hydra(exc)
    if hydra_msg is not None:
        return hydra_msg
    return None


def _describe_hydra(exc: BaseException) -> Optional[str]:
    try:
        from hydra.errors import HydraException, MissingConfigException
        from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
    except ImportError:   # tools that never compose a config
        return None
    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    omega = exc if isinstance(exc, OmegaConfBaseException) else cause
    if omega is not None and getattr(omega, "full_key", None):
        key, msg = omega.full_key, _one_line(getattr(omega, "msg", None) or str(omega))
        if isinstance(omega, (ConfigKeyError, ConfigAttributeError)):
            fix = ("check the spelling; the keys of each group are the fields of its dataclass in "
                   "engram_train/config/schema.py")
        else:
            fix = "give a value of the key's type (see engram_train/config/schema.py)"
        return f"{key}: {msg}; {fix}"
    msg = _one_line(str(exc))
    override = getattr(exc, "override", None)   # OverrideParseException: the override it could not read
    if isinstance(override, str):
        msg = f"cannot read the override {override!r}: {msg} (quote lists and strings for the shell)"
    if isinstance(exc, MissingConfigException):
        msg += "; choose one of the files under conf/ of that group (without .yaml)"
    elif cause is not None:
        msg += f" ({_one_line(str(cause))})"
    return msg


def _one_line(text: str) -> str:
    """Hydra's multi-line messages on one line, without the config search path it appends."""
    text = text.split("Config search path:")[0]
    lines = [ln.strip() for ln in text.strip().splitlines()
             if not ln.strip().startswith(("full_key:", "reference_type=", "object_type="))]
    out = ""
    for ln in lines:
        if not ln:
            continue
        if not out:
            out = ln
        elif out.endswith(":"):
            out += " " + ln
        elif ln[0].isalnum() and not out.endswith((".", ";")) and " " not in ln:
            out += ", " + ln       # a list of options, one per line
        else:
            out += ("" if out.endswith((".", ";")) else ";") + " " + ln
    return out


def _dist():
    # Only when torch is loaded already: a tool that never imported it must not pay for it here.
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _store(dist):
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _claim_report(node_local: bool = False) -> bool:
    """True on the one rank that prints (module docstring)."""
    dist = _dist()
    if dist is None:
        return os.environ.get("RANK", "0") in ("", "0") or (node_local and _local_rank_0())
    store = _store(dist)
    if store is None:
        return True
    try:
        return store.add(_STORE_KEY, 1) == 1
    except Exception:
        return True


def _local_rank_0() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def _other_node() -> bool:
    return os.environ.get("RANK", "0") not in ("", "0") and _local_rank_0()


def _peer_reported() -> bool:
    """True when another rank has already reported a user error (this rank's failure follows from it)."""
    dist = _dist()
    if dist is None:
        return False
    store = _store(dist)
    if store is None:
        return False
    try:
        return store.add(_STORE_KEY, 0) > 0
    except Exception:
        return False


def exit_code_for(exc: BaseException, prog: str = "", node_local: bool = False) -> Optional[int]:
    """Report ``exc`` if it is a user error (or the echo of one on another rank) and return the exit
    code; None means: not a user error, let it propagate with its traceback."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or debug_requested():
        return None
    msg = describe(exc)
    if msg is None:
        return USER_ERROR_EXIT if _peer_reported() else None
    if _claim_report(node_local):
        prefix = f"{prog}: " if prog else ""
        if node_local and _other_node() and _dist() is None:
            import socket

            prefix += f"[{socket.gethostname()}] "
        print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def run_main(fn: Callable[..., T], *args, prog: str = "", node_local: bool = False, **kwargs) -> T:
    """``fn(*args, **kwargs)``; a user error ends the process: ``error: <message>``, exit code 2.
    ``node_local``: ``fn`` checks this node's files, so each node reports (module docstring)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        code = exit_code_for(e, prog, node_local)
        if code is None:
            raise
        _leave(code)


def _leave(code: int):
    dist = _dist()
    if dist is not None:
        try:   # without it torch warns at exit that the process group leaked
            dist.destroy_process_group()
        except Exception:
            pass
    sys.exit(code)
