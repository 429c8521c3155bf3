"""Encryption of tokens at rest, with a key list that supports rotation.

MultiFernet encrypts with the first key of `LOOP_SYNC_ENCRYPTION_KEYS` and decrypts with
any of them, so a new key goes first, `loop-sync keys rotate` re-encrypts, and the old key
can then be dropped.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from loop_sync.errors import ConfigError

WRONG_KEY = (
    "a stored token cannot be decrypted with any key in LOOP_SYNC_ENCRYPTION_KEYS; "
    "put back the key it was encrypted with (after the new first key while rotating)"
)


class TokenCipher:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            msg = "LOOP_SYNC_ENCRYPTION_KEYS holds no key; make one with `loop-sync keys generate`"
            raise ConfigError(msg)
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode()
        except InvalidToken:
            raise ConfigError(WRONG_KEY) from None

    def rotate(self, ciphertext: str) -> str:
        """The same plaintext, re-encrypted under the first key."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise ConfigError(WRONG_KEY) from None
