"""One exception type for everything a user can fix; the CLI prints it as a single line."""


class UserError(Exception):
    """A problem with the user's input (files, config, weights) whose message says what to do."""
