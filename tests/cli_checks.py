"""The command line's error contract, checked by the tests of every command: a user error exits
with code 2 and prints exactly one `error:` line, naming what was wrong, and no traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from radpath_fs.cli import app


def invoke(argv: list):
    return CliRunner().invoke(app, [str(a) for a in argv])


def exits_2_with(result, *words: str) -> str:
    """The error text of `result`, after asserting the contract and that it names every word."""
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert err.count("error:") == 1 and "Traceback" not in result.output, err
    for w in words:
        assert w in err, (w, err)
    return err
