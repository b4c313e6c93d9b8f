"""The one exception the app shows to people as it is."""


class UserError(ValueError):
    """A request the app refuses; the message is shown to the user as is."""
