"""Run the `dllmq` CLI in-process for tests."""

import sys

from dllmq.cli.main import main


def run_cli(args, capsys):
    """Run `dllmq ARGS` in-process; returns (exit_code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["dllmq", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err
