"""Run a writer of an export folder and SIGKILL it at one step boundary: the fault injection of
tests/test_folder_transaction.py, added from outside (the library has no kill hooks).

    python tests/kill_points.py KILL_AT [--no-exchange] -m MODULE ARGS...     as ``python -m MODULE ARGS...``
    python tests/kill_points.py KILL_AT [--no-exchange] publish PREPARED OUT   export.build's publishing, torch-free

A step boundary is just before or just after a change of a name in the filesystem: ``os.replace`` and
``os.rename`` (every atomic write - the staging folder's files, the manifest, an engine - and the two-rename swap)
and the one-step swap (``compress.plumbing.folder_transaction.exchange``). KILL_AT: ``k`` > 0 dies at boundary k
(odd: before change (k + 1) / 2, even: after change k / 2), ``before:exchange`` just before the swap, 0 never;
``wait@BOUNDARY`` instead prints ``waiting`` on stdout there and goes on once a line arrives on stdin (a writer
held inside its transaction, for the concurrency test). ``--no-exchange``: as on a filesystem without
RENAME_EXCHANGE. A writer that ends prints, as its last line on stderr, the changes it made:
``changes: replace,replace,exchange``.

``publish PREPARED OUT``: what ``export.api.export_model`` does once its graphs are validated, with the files of
the finished export PREPARED instead of exporting them again: under OUT's transaction, every file into the
staging folder (each one an atomic write, the manifest last), then the user's files carried over
(export.publishing), then the swap. It imports no torch, so a kill costs a fraction of a second.
"""
from __future__ import annotations

import atexit
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, tests/ is first on sys.path

import compress.plumbing.folder_transaction as transaction  # noqa: E402  (after the path is set)

changes: list[str] = []


def die_at(boundary: int, name: str, before: bool, kill_at: str) -> None:
    action, _, at = kill_at.rpartition("@")
    if at not in (str(boundary), f"{'before' if before else 'after'}:{name}"):
        return
    if action == "wait":
        print("waiting", flush=True)
        sys.stdin.readline()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def counted(name: str, change, kill_at: str):
    """``change`` that records itself and dies at its two boundaries when asked."""

    def boundary_wrapped(*args, **kwargs):
        changes.append(name)
        die_at(2 * len(changes) - 1, name, True, kill_at)
        result = change(*args, **kwargs)
        die_at(2 * len(changes), name, False, kill_at)
        return result

    return boundary_wrapped


def publish(prepared: Path, out: Path) -> None:
    from compress.plumbing.files import atomic_write
    from export.publishing import EXPORT_OWNER, MANIFEST_NAME, carry_over_user_files, previous_manifest

    with transaction.folder_transaction(out, owner=EXPORT_OWNER) as staging:
        previous = previous_manifest(out)
        names = sorted(p.name for p in prepared.iterdir() if p.name != MANIFEST_NAME) + [MANIFEST_NAME]
        for name in names:
            data = (prepared / name).read_bytes()
            atomic_write(staging / name, lambda temporary: Path(temporary).write_bytes(data))
        carry_over_user_files(out, staging, previous)


def main(argv: list[str]) -> None:
    kill_at, *rest = argv
    no_exchange = rest[:1] == ["--no-exchange"]
    rest = rest[no_exchange:]
    os.replace = counted("replace", os.replace, kill_at)
    os.rename = counted("rename", os.rename, kill_at)
    transaction.exchange = ((lambda first, second: False) if no_exchange
                            else counted("exchange", transaction.exchange, kill_at))
    atexit.register(lambda: print(f"changes: {','.join(changes)}", file=sys.stderr))
    if rest[0] == "-m":
        sys.argv = rest[1:]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "publish":
        publish(Path(rest[1]), Path(rest[2]))
    else:
        raise SystemExit(f"unknown writer {rest[0]!r}: -m MODULE ARGS... or publish PREPARED OUT")


if __name__ == "__main__":
    main(sys.argv[1:])
