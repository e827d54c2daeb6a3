"""The errors longmoe raises for bad input or impossible work. Each message names the problem and the fix; the CLI
prints it as one line and exits with status 2. (A leaf module: every layer may import it.)"""


class LongmoeError(Exception):
    """Base class: anything the user can fix by changing their input, settings or machine."""


class TrainError(LongmoeError, RuntimeError):
    """Training cannot go on (a non-finite loss, a run directory in the way, a resume that does not match)."""
