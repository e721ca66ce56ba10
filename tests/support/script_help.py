"""Run each script given on the command line as `python <script> --help` would, one after another in
this one interpreter (each as __main__, with its folder first on sys.path); print a JSON object
{script name: {"code": exit status, "stdout": ..., "stderr": ...}}. One interpreter instead of one per
script: the imports of torch and Lightning are paid once."""

import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path


def help_of(script: Path) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[0] = [str(script), "--help"], str(script.parent)
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported, as a crashing script would show it
            traceback.print_exc()
            code = 1
    sys.argv, sys.path[:] = argv, path
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


if __name__ == "__main__":
    print(json.dumps({Path(arg).name: help_of(Path(arg)) for arg in sys.argv[1:]}))
