"""loop-sync's one settings object, read once from the environment and `.env`.

The Loop quickstart's variables keep their names (`LOOP_CLIENT_ID`, `LOOP_CLIENT_SECRET`,
`LOOP_REDIRECT_URI`); ours start with `LOOP_SYNC_`. Secrets are `SecretStr`, so a settings
object can be printed or logged without leaking them. A bad value stops with one line that
names the variable and the fix, and never echoes the value.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from loop_sync import contract
from loop_sync.errors import ConfigError

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# What to do about each variable, said once, used in every error about it.
FIXES = {
    "LOOP_CLIENT_ID": "set it to your Loop app's client id",
    "LOOP_CLIENT_SECRET": "set it to your Loop app's client secret",
    "LOOP_REDIRECT_URI": (
        "set it to the callback URL registered for your Loop app, exactly, "
        "e.g. http://localhost:8000/callback"
    ),
    "LOOP_ISSUER": f"set it to the Loop identity URL, e.g. {contract.DEFAULT_ISSUER}",
    "LOOP_API_BASE_URL": (
        f"set it to the Loop clinical API URL, e.g. {contract.DEFAULT_API_BASE_URL}"
    ),
    "LOOP_SCOPES": f"set it to space-separated scopes, e.g. {' '.join(contract.DEFAULT_SCOPES)}",
    "LOOP_SYNC_DATABASE_URL": (
        "set it to a SQLAlchemy URL, e.g. sqlite:///loop_sync.db or "
        "postgresql+psycopg://user@host/dbname"
    ),
    "LOOP_SYNC_ENCRYPTION_KEYS": (
        "set it to one or more comma-separated Fernet keys; make one with `loop-sync keys generate`"
    ),
    "LOOP_SYNC_RATE_LIMIT_RPS": (
        "set it to the requests per second Loop allows your client_id (a positive number)"
    ),
    "LOOP_SYNC_CONCURRENCY": "set it to how many users to sync at once (1-256)",
    "LOOP_SYNC_PAGE_SIZE": f"set it to a page size from 1 to {contract.PAGE_LIMIT_MAX}",
    "LOOP_SYNC_USER_TIME_BUDGET_S": "set it to the seconds one user's sync may take (> 0)",
    "LOOP_SYNC_RETRY_AFTER_CAP_S": "set it to the longest Retry-After to honour, seconds (> 0)",
    "LOOP_SYNC_ONBOARD_DEPLOYMENT": (
        "set it to the Prefect deployment the web app starts after a consent, "
        "e.g. onboard/onboard, or leave it unset"
    ),
}


# The driver of each database loop-sync writes to (the PostgreSQL COPY path is psycopg's).
DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg"}
PERCENT_ENCODE = "percent-encode @ : / in the user name or password as %40 %3A %2F"


def _web_url(value: str, *, allow_query: bool = True) -> str:
    """An absolute URL, https unless on loopback (Loop allows http://localhost for dev)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = "must be an absolute http(s) URL"
        raise ValueError(msg)
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        msg = "must use https (plain http is only allowed on localhost)"
        raise ValueError(msg)
    if parts.fragment or (parts.query and not allow_query):
        msg = "must not carry a query or a fragment"
        raise ValueError(msg)
    return value.strip()


def _database_url(value: str) -> str:
    """A SQLAlchemy URL for a warehouse loop-sync can write: SQLite, or PostgreSQL through
    psycopg (3). No message quotes the value: it may hold a password."""
    try:
        url = make_url(value.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        msg = f"is not a SQLAlchemy database URL ({PERCENT_ENCODE})"
        raise ValueError(msg) from None
    if "@" in (url.host or ""):  # an unencoded @ in the password: the rest became the host
        msg = f"holds more than one @ before the host ({PERCENT_ENCODE})"
        raise ValueError(msg)
    backend, _, driver = url.drivername.partition("+")
    if backend not in DRIVERS:
        msg = "names a database loop-sync cannot use: the warehouse is SQLite or PostgreSQL"
        raise ValueError(msg)
    if driver not in ("", DRIVERS[backend]):
        msg = f"names a driver loop-sync does not ship: use {backend}+{DRIVERS[backend]}://"
        raise ValueError(msg)
    if backend == "postgresql" and not driver:  # SQLAlchemy 2.0 would pick psycopg2
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return value.strip()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    client_id: str = Field(validation_alias="LOOP_CLIENT_ID", min_length=1)
    client_secret: SecretStr = Field(validation_alias="LOOP_CLIENT_SECRET", min_length=1)
    redirect_uri: str = Field(validation_alias="LOOP_REDIRECT_URI")
    issuer: str = Field(contract.DEFAULT_ISSUER, validation_alias="LOOP_ISSUER")
    api_base_url: str = Field(contract.DEFAULT_API_BASE_URL, validation_alias="LOOP_API_BASE_URL")
    scopes: Annotated[tuple[str, ...], NoDecode] = Field(
        contract.DEFAULT_SCOPES, validation_alias="LOOP_SCOPES"
    )
    database_url: SecretStr = Field(
        SecretStr("sqlite:///loop_sync.db"), validation_alias="LOOP_SYNC_DATABASE_URL"
    )
    encryption_keys: SecretStr = Field(validation_alias="LOOP_SYNC_ENCRYPTION_KEYS")
    # Floats are finite: "inf" would parse, and then break the rate budget or the timeouts.
    rate_limit_rps: float = Field(
        10.0, gt=0, allow_inf_nan=False, validation_alias="LOOP_SYNC_RATE_LIMIT_RPS"
    )
    concurrency: int = Field(32, ge=1, le=256, validation_alias="LOOP_SYNC_CONCURRENCY")
    page_size: int = Field(
        contract.PAGE_LIMIT_MAX,
        ge=1,
        le=contract.PAGE_LIMIT_MAX,
        validation_alias="LOOP_SYNC_PAGE_SIZE",
    )
    user_time_budget_s: float = Field(
        300.0, gt=0, allow_inf_nan=False, validation_alias="LOOP_SYNC_USER_TIME_BUDGET_S"
    )
    retry_after_cap_s: float = Field(
        120.0, gt=0, allow_inf_nan=False, validation_alias="LOOP_SYNC_RETRY_AFTER_CAP_S"
    )
    onboard_deployment: str | None = Field(
        None, pattern=r"^[^/\s]+/[^/\s]+$", validation_alias="LOOP_SYNC_ONBOARD_DEPLOYMENT"
    )

    @field_validator("redirect_uri")
    @classmethod
    def _redirect_uri(cls, value: str) -> str:
        return _web_url(value, allow_query=False)

    @field_validator("issuer", "api_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _web_url(value).rstrip("/")

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: Any) -> Any:
        scopes = tuple(value.split()) if isinstance(value, str) else value
        if not scopes:
            msg = "must name at least one scope"
            raise ValueError(msg)
        return scopes

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        return SecretStr(_database_url(value.get_secret_value()))

    @field_validator("encryption_keys")
    @classmethod
    def _fernet_keys(cls, value: SecretStr) -> SecretStr:
        keys = [k.strip() for k in value.get_secret_value().split(",") if k.strip()]
        if not keys:
            msg = "holds no key"
            raise ValueError(msg)
        for position, key in enumerate(keys, start=1):
            try:
                Fernet(key)
            except ValueError:
                msg = f"key {position} is not a valid Fernet key"
                raise ValueError(msg) from None
        return value

    @property
    def fernet_keys(self) -> list[str]:
        """The encryption keys, newest (the one that encrypts) first."""
        raw = self.encryption_keys.get_secret_value()
        return [k.strip() for k in raw.split(",") if k.strip()]

    @property
    def database_url_display(self) -> str:
        """The database URL with any password hidden, for messages and logs."""
        return make_url(self.database_url.get_secret_value()).render_as_string(hide_password=True)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a problem becomes one ConfigError line naming each variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        var = str(error["loc"][0]) if error["loc"] else "configuration"
        var = _ENV_NAMES.get(var, var)
        if error["type"] == "missing":
            what = "is not set"
        else:
            what = "is invalid: " + str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{var} {what}; {FIXES.get(var, 'fix it')}")
    return " | ".join(problems)


_ENV_NAMES = {name: str(field.validation_alias) for name, field in Settings.model_fields.items()}
