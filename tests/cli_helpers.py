"""Running the `attnlrp-fast` command in the test process, and what a one-line error looks like."""

from attnlrp_fast.app import cli


def run_cli(argv, capsys):
    """cli.main(argv) here; (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *parts):
    """Exit status 2 and one line on stderr holding every part."""
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)
