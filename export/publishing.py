"""Publishing an export into its folder: what a previous export folder holds and which of its files are the user's
(torch-free, so a fault-injection test can run it in a cheap child process).

``export.api.export_model`` writes the new export into the staging folder of a
``compress.plumbing.folder_transaction``, then hard-links the user's files into it, so the swap replaces the
tool's files and keeps everything else where it was.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress.plumbing.folder_transaction import link_into
from export.errors import ExportError

MANIFEST_NAME = "manifest.json"
EXPORT_OWNER = "python -m export.build"  # in the lock file: a second writer's refusal names it


def previous_manifest(out: Path) -> dict | None:
    """The manifest of an earlier export in ``out``; refuse a folder with other content and no manifest."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise ExportError(f"--out {out} is a folder with other content and no {MANIFEST_NAME}: choose a new or empty "
                          "folder, or a previous export folder to update") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"--out {out}: its {MANIFEST_NAME} is unreadable ({exc}); move it away first") from None


def written_by_the_tool(previous: dict) -> set[str]:
    """The names in a previous export folder that the tool wrote: its manifest and every artefact it lists."""
    listed = {a["path"] for a in previous.get("artifacts", []) if isinstance(a, dict) and "path" in a}
    return listed | {MANIFEST_NAME}


def carry_over_user_files(out: Path, staging: Path, previous: dict | None) -> list[str]:
    """Hard-link into the staging folder the files of the previous export folder that this tool did not write,
    so they stay where they are once the new folder is swapped in; their names. Of the tool's own files, the
    new export's replace the old, and those only the old manifest lists are gone with the old folder."""
    if previous is None:
        return []
    written_now = {p.name for p in staging.iterdir()}
    theirs = sorted(p.name for p in out.iterdir() if p.name not in written_by_the_tool(previous) | written_now)
    link_into(out, staging, theirs)
    return theirs
