"""The encrypted on-device store for everything EdgePerso keeps about a user.

    with Store.open("profile.db", key=KeyringKey("com.example.app", "default")) as store:
        ids = store.add_examples("alice", [Example("hi", label="greeting", timestamp=t)])
        store.put_blob("alice", "adapter", weights)
        store.forget_user("alice")

See docs/store.md for the format, what metadata stays visible and the threat model.
"""

from edgeperso.store._codec import Example, Feedback, JSONValue
from edgeperso.store._counter import KeyringCounter, SidecarCounter
from edgeperso.store._keys import KeyProvider, KeyringKey, PassphraseKey, RawKey
from edgeperso.store._lock import UserLock
from edgeperso.store._store import Store, StoreConfig

__all__ = [
    "Example",
    "Feedback",
    "JSONValue",
    "KeyProvider",
    "KeyringCounter",
    "KeyringKey",
    "PassphraseKey",
    "RawKey",
    "SidecarCounter",
    "Store",
    "StoreConfig",
    "UserLock",
]
