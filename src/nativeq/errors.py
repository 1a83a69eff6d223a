"""The one exception type users see.

Library code raises `NativeqError` with a one-line message naming the problem (file, node,
op, target, missing tool and the command that installs it). The CLI prints it as
`error: <message>` and exits with `exit_code`; it never shows a traceback for these.
"""


class NativeqError(Exception):
    """A user-facing error: the message is one line and says what to do."""

    exit_code = 2


class VerificationFailed(NativeqError):
    """The compiled artifact disagrees with the reference beyond tolerance."""

    exit_code = 1
