"""User-facing errors: raised for bad input, printed without a traceback by the CLI."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = 2
