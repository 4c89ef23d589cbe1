"""The one exception the data layer raises for anything a user can cause."""


class DataError(Exception):
    """A problem with input files or a prepared dataset. The message names the file and what to do;
    the command line prints it as one line and exits non-zero."""
