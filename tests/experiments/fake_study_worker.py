"""A stand-in for ``experiments.study_worker`` that tests the job pool's protocol.

Reads ``<kind>\t<name>`` lines like the real worker. ``ok`` jobs write a row
naming this process; a ``die`` job prints a line and ends the process with
exit code 3 without writing a row (as a crash inside XLA would).
"""

import json
import os
import sys
from pathlib import Path

from experiments.seed_study import row_path


def main(root: Path) -> None:
    for line in sys.stdin:
        kind, name = line.rstrip("\n").split("\t")
        if kind == "die":
            row_path(root, (kind, name)).with_suffix(".log").write_text(f"dying on {name}\n")
            os._exit(3)
        path = row_path(root, (kind, name))
        path.with_suffix(".partial").write_text(json.dumps({"name": name, "pid": os.getpid()}))
        os.replace(path.with_suffix(".partial"), path)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
