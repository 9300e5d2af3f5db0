"""One exception type for mistakes a user can fix; the command lines print it as one line."""


class UserError(Exception):
    pass
