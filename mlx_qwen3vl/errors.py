"""The one exception type the package raises for problems a user can fix (bad files, inputs, options)."""


class Qwen3VLError(ValueError):
    """A clear, one-line description of what is wrong with the user's input and what to do about it."""
