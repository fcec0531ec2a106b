"""The command line's refusals, as the tests check them: in-process, exit status 2, exactly one line
``flowtile: error: ...`` on stderr and no traceback."""
from __future__ import annotations

__all__ = ["assert_cli_refuses"]


def assert_cli_refuses(capsys, argv, *fragments) -> str:
    """Run ``flowtile argv`` in-process (pytest's ``capsys`` capturing): it exits with status 2 and writes one
    ``flowtile: error:`` line holding every one of ``fragments`` and no traceback. Returns that line."""
    from flowtile import cli
    argv = [str(a) for a in argv]
    status = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowtile: error:")]
    assert status == 2, (argv[0], err)
    assert len(lines) == 1 and "Traceback" not in err, (argv[0], err)
    for fragment in fragments:
        assert fragment in lines[0], (argv[0], lines[0])
    return lines[0]
