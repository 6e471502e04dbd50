"""Typed errors. Each says what is wrong and what to do next."""


class AdapterflowError(Exception):
    """Base class of every error this project raises on purpose."""


class SpecError(AdapterflowError):
    """A pipeline spec is invalid: unknown key, wrong type, impossible combination."""


class DataError(AdapterflowError):
    """Training or evaluation data is missing or does not match the spec."""


class ModelError(AdapterflowError):
    """A base model cannot be found or loaded."""


class AdapterIntegrityError(AdapterflowError):
    """An adapter artifact is missing files, was tampered with, or does not fit its base."""


class UnknownAdapterError(AdapterflowError):
    """An adapter name or URI that nothing resolves."""
