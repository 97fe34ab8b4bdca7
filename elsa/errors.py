"""One exception type for every user-facing mistake, so the CLI can print one clear line."""


class ElsaError(Exception):
    """A problem the user can fix (bad key/value, missing file, unreachable hub...).

    The message names the key, the value and what is allowed; the CLI prints it as one line.
    """


def config_error(key: str, value, allowed: str) -> ElsaError:
    return ElsaError(f"{key}={value!s} is not allowed: {allowed}")
