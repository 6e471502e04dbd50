"""The one error tree. Every error raised on purpose derives from `AdapterflowError`.

`UserError`s are mistakes a user can fix (a spec key, a missing file, a tampered adapter, a bad
request): the CLI prints them without a traceback (exit code 2) and the HTTP app answers them with
their `http_status`. Anything else is a fault of the platform or its environment.
"""


class AdapterflowError(Exception):
    """Root of every error this project raises on purpose."""

    http_status = 500


class UserError(AdapterflowError):
    """Something the user can fix; the message says what is wrong and what to do."""

    http_status = 400


class SpecError(UserError):
    """A pipeline spec is invalid: unknown key, wrong type, impossible combination."""


class PluginError(SpecError):
    """A method plugin cannot be imported or does not register a valid method."""


class DataError(UserError):
    """Training or evaluation data is missing or does not match the spec."""


class ModelError(UserError):
    """A base model cannot be found or loaded."""


class AdapterIntegrityError(UserError):
    """An adapter artifact is missing files, was tampered with, or does not fit its base."""

    http_status = 409


class UnknownAdapterError(UserError):
    """An adapter name or URI that nothing resolves."""

    http_status = 404


class WrongTaskError(UserError):
    """A request for a task or a feature the adapter does not have."""

    http_status = 400


class RequestError(UserError):
    """A malformed request to a served endpoint."""

    http_status = 422


class RequestTooLargeError(UserError):
    """A request over a serving limit (body bytes, inputs, prompt tokens, an adapter's weight bytes)."""

    http_status = 413


class AuthError(UserError):
    """A request without the right API key."""

    http_status = 401


class ForbiddenError(UserError):
    """A request the server refuses whoever sends it (an admin route that is off, a folder outside
    the allow-listed roots)."""

    http_status = 403


class ResourceError(UserError):
    """The job cannot get the resources it asks for."""

    http_status = 503


class TrainingError(AdapterflowError):
    """A training run ended without the result it should have produced."""


class TrackingError(AdapterflowError):
    """The tracking server did not answer (after its client's retries); what it missed is saved locally."""


class ClusterConnectionError(UserError):
    """A Ray cluster's address that does not answer (nothing was submitted)."""

    http_status = 503


class ClusterAuthError(UserError):
    """A Ray cluster that checks tokens refused this client's (missing or wrong) token."""

    http_status = 401


class UnknownJobError(UserError):
    """A Ray job id the cluster does not know."""

    http_status = 404


class JobSubmitError(AdapterflowError):
    """A Ray cluster that answered but did not accept a job (or its secrets)."""
