"""The exception types the package raises for problems a user can fix (bad files, inputs, options)."""


class Qwen3VLError(ValueError):
    """A clear, one-line description of what is wrong with the user's input and what to do about it."""


class BrokenWeightsError(Qwen3VLError):
    """The model itself is at fault, not the request: its weights give values that are not numbers. The
    server answers it with a 500 (a client can do nothing about it), with this message."""


class LostRankError(Qwen3VLError):
    """Across ranks (distributed/), another rank went away: this one cannot go on. The command-line tools
    exit with status 1 for it, as for any failure after they started (2: a problem with their input)."""
