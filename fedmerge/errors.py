"""The one error type that the CLI reports as a single clear sentence."""


class FedmergeError(Exception):
    """Bad input or environment: the message names the problem and the fix.

    The command-line interface prints the message on one line and exits with code 2,
    without a traceback.
    """
