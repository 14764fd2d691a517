"""Error policy: user mistakes raise a subclass of ExfmError with a message that names the
field, column or row; the CLI prints it without a stack trace. A failure of the system itself (a
run that crashed, a job that never published) raises PipelineFailure or any other exception, and
the CLI shows its traceback. Internal invariants use assert."""


class ExfmError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(ExfmError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataError(ExfmError, ValueError):
    """Input data does not fit the stream schema: names the column and, where known, the row."""

    def __init__(self, message: str, *, column: str | None = None, row: int | None = None):
        where = []
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.column = column
        self.row = row


class FMUnavailable(ExfmError):
    """The FM group cannot answer now (a gang is rebuilding or not started). Retryable."""

    retryable = True


class TenantNotFound(ExfmError, LookupError):
    """No published checkpoint for the tenant (HTTP 404 when serving)."""

    def __init__(self, tenant: str):
        super().__init__(f"unknown tenant {tenant!r}: no published student checkpoint")
        self.tenant = tenant


class PipelineFailure(RuntimeError):
    """Part of the loop failed (a tenant run, the FM job, a service that never answered): not the
    user's input, so it is reported with its traceback."""
