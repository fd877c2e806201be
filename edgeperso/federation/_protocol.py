"""The device's side of secure aggregation as a state machine without I/O.

Each method takes what the coordinator sent for one stage and returns what to upload; the
state between stages serialises to bytes so that an app restart resumes the round. The same
class drives the HTTP client, the benchmark's async clients and the in-process tests.

    stage          device sends                         device receives next
    advertise      c_pk, s_pk                           neighbours' keys, its index, t
    share_keys     sealed Shamir shares of s_sk and b   sealed shares addressed to it
    masked_input   y = x + masks (uint32)               the survivors
    unmasking      b shares of survivors, s shares of dropped neighbours
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Collection, Mapping

import numpy as np

from edgeperso._errors import IntegrityError, InvalidInputError
from edgeperso.federation import _crypto, _secagg

_SHARE_PAIR = 2 * _secagg.SHARE_BYTES


def pair_seeds(private: bytes, peers: Mapping[int, bytes], round_id: str) -> dict[int, bytes]:
    """The pairwise mask seeds s_uv shared with each peer (by its mask public key), one round."""
    return _crypto.agree_many(private, peers, b"edgeperso/secagg/mask|" + round_id.encode())


def _channel_keys(private: bytes, peers: Mapping[int, bytes], round_id: str) -> dict[int, bytes]:
    return _crypto.agree_many(private, peers, b"edgeperso/secagg/share|" + round_id.encode())


def _share_aad(round_id: str, sender: int, recipient: int) -> bytes:
    return f"edgeperso/secagg/share|{round_id}|{sender}|{recipient}".encode()


class TooFewSurvivorsError(InvalidInputError):
    """Fewer than the threshold of a device's neighbours survived: its round cannot complete,
    and it reveals nothing."""


@dataclasses.dataclass
class SecAggClient:
    """One device's secrets and progress in one round; lives only until the round ends."""

    round_id: str
    c_sk: bytes  # channel key: seals shares to neighbours
    c_pk: bytes
    s_sk: bytes  # mask key: pairwise mask seeds; revealed only if this device drops
    s_pk: bytes
    self_seed: bytes  # b_u
    index: int = 0
    threshold: int = 0
    peers: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    revealed_for: tuple[int, ...] | None = None  # the one survivors list shares went out for
    _channel: dict[int, bytes] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def start(cls, round_id: str) -> SecAggClient:
        c_sk, c_pk = _crypto.generate_keypair()
        s_sk, s_pk = _crypto.generate_keypair()
        return cls(round_id, c_sk, c_pk, s_sk, s_pk, _crypto.random_seed())

    def share_keys(
        self, index: int, neighbours: Mapping[int, tuple[bytes, bytes]], threshold: int
    ) -> dict[int, bytes]:
        """Sealed shares of (s_sk, b) for each neighbour that advertised keys."""
        if index in neighbours or index < 1:
            raise InvalidInputError("the coordinator listed this device among its own neighbours")
        keys = [k for pair in neighbours.values() for k in pair] + [self.c_pk, self.s_pk]
        if len(set(keys)) != len(keys):
            raise IntegrityError("two devices advertised the same key; refusing to share secrets")
        if len(neighbours) < threshold:
            raise InvalidInputError(
                f"{len(neighbours)} neighbours cannot hold a {threshold}-threshold secret"
            )
        if 2 * threshold <= len(neighbours):
            # Below a majority, the coordinator could gather t shares of this device's
            # self-mask seed from some neighbours and t of its mask key from the others.
            raise InvalidInputError(
                f"a threshold of {threshold} for {len(neighbours)} neighbours is not a "
                "majority; refusing to share secrets that a minority could reconstruct"
            )
        # The mask keys are used only at masked_input, after the shares went out: check them
        # now. (The channel keys are: _channels() below refuses a low-order one.)
        for _, s_pk in neighbours.values():
            _crypto.check_public_key(s_pk, "a neighbour's mask key")
        self.index, self.threshold, self.peers = index, threshold, dict(neighbours)
        xs = sorted(neighbours)
        s_shares = _secagg.shamir_split(self.s_sk, xs, threshold)
        b_shares = _secagg.shamir_split(self.self_seed, xs, threshold)
        channel = self._channels()
        return {
            v: _crypto.seal(
                channel[v], s_shares[v] + b_shares[v], _share_aad(self.round_id, index, v)
            )
            for v in xs
        }

    def masked_input(self, encoded: np.ndarray, inbox: Mapping[int, bytes]) -> np.ndarray:
        """y = x + PRG(b) +- PRG(s_uv) for each neighbour whose shares arrived (uint32)."""
        if len(inbox) < self.threshold:
            raise InvalidInputError(
                f"only {len(inbox)} neighbours shared keys; the round cannot reach its threshold"
            )
        unknown = set(inbox) - set(self.peers)
        if unknown:
            raise IntegrityError("received shares from devices that are not neighbours")
        channel = self._channels()
        for v, sealed in inbox.items():
            plain = _crypto.unseal(channel[v], sealed, _share_aad(self.round_id, v, self.index))
            if len(plain) != _SHARE_PAIR:
                raise IntegrityError("a decrypted share pair has the wrong length")
            self.held[v] = (plain[: _secagg.SHARE_BYTES], plain[_secagg.SHARE_BYTES :])
        seeds = pair_seeds(self.s_sk, {v: self.peers[v][1] for v in inbox}, self.round_id)
        prg = _crypto.MaskExpander(encoded.shape[0])
        masked = encoded.astype(np.uint32, copy=True)
        masks = ((_secagg.pair_sign(self.index, v), prg.expand(seeds[v])) for v in sorted(seeds))
        _secagg.add_masks(masked, [(1, prg.expand(self.self_seed))])
        _secagg.add_masks(masked, masks)
        return masked

    def _channels(self) -> dict[int, bytes]:
        """AES-GCM keys shared with each neighbour, derived once per round."""
        if set(self._channel) != set(self.peers):
            channel_keys = {v: c_pk for v, (c_pk, _) in self.peers.items()}
            self._channel = _channel_keys(self.c_sk, channel_keys, self.round_id)
        return self._channel

    def reveal(self, survivors: Collection[int]) -> list[tuple[int, str, bytes]]:
        """(neighbour, "b" or "s", share): b shares of survivors, mask-key shares of the rest.

        Never both kinds for one neighbour: that would hand the coordinator its input. So
        shares go out for one survivors list only: asked again (a resumed device), the same
        list gets the same answer and any other list is refused. Nothing is revealed when
        fewer than `threshold` neighbours survive: the round cannot complete then.
        """
        alive = set(survivors)
        if self.index not in alive:
            raise InvalidInputError("this device is not among the survivors of its own round")
        listed = tuple(sorted(alive))
        if self.revealed_for is not None and listed != self.revealed_for:
            raise IntegrityError(
                "the coordinator sent another survivors list after this device revealed its "
                "shares for a first one; refusing, since both answers together could unmask "
                "a neighbour's input"
            )
        standing = len(alive & set(self.peers))
        if standing < self.threshold:
            raise TooFewSurvivorsError(
                f"only {standing} of this device's neighbours survived, fewer than the "
                f"threshold {self.threshold}: the round cannot complete; nothing revealed"
            )
        self.revealed_for = listed
        return [
            (v, "b", b_share) if v in alive else (v, "s", s_share)
            for v, (s_share, b_share) in sorted(self.held.items())
        ]

    def to_bytes(self) -> bytes:
        def b64(value: bytes) -> str:
            return base64.b64encode(value).decode()

        state = {
            "round_id": self.round_id,
            "keys": [b64(k) for k in (self.c_sk, self.c_pk, self.s_sk, self.s_pk, self.self_seed)],
            "index": self.index,
            "threshold": self.threshold,
            "peers": {str(v): [b64(c), b64(s)] for v, (c, s) in self.peers.items()},
            "held": {str(v): [b64(s), b64(b)] for v, (s, b) in self.held.items()},
            "revealed_for": None if self.revealed_for is None else list(self.revealed_for),
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        try:
            state = json.loads(data)
            revealed = state.get("revealed_for")  # absent in states saved by older versions
            c_sk, c_pk, s_sk, s_pk, seed = (base64.b64decode(k) for k in state["keys"])

            def pairs(field: str) -> dict[int, tuple[bytes, bytes]]:
                return {
                    int(v): (base64.b64decode(a), base64.b64decode(b))
                    for v, (a, b) in state[field].items()
                }

            return cls(
                str(state["round_id"]),
                c_sk,
                c_pk,
                s_sk,
                s_pk,
                seed,
                int(state["index"]),
                int(state["threshold"]),
                pairs("peers"),
                pairs("held"),
                None if revealed is None else tuple(int(v) for v in revealed),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"saved round state is unreadable ({type(exc).__name__})") from exc


def unmask_sum(
    round_id: str,
    masked_sum: np.ndarray,  # [L] uint32: sum of the survivors' masked inputs
    self_seeds: Collection[bytes],  # b_u of every survivor
    dropped: Mapping[int, bytes],  # index -> reconstructed s_sk of a device that dropped
    mask_keys: Mapping[int, bytes],  # index -> advertised s_pk, for every device
    masked_with: Mapping[int, Collection[int]],  # dropped index -> survivors that masked with it
) -> np.ndarray:  # [L] uint32: the sum of the survivors' inputs
    """The coordinator's last step: strip self masks and the dropped devices' pair masks."""
    prg = _crypto.MaskExpander(masked_sum.shape[0])
    total = masked_sum.astype(np.uint32, copy=True)
    _secagg.add_masks(total, ((-1, prg.expand(seed)) for seed in self_seeds))
    for u, s_sk in dropped.items():
        if _crypto.public_key(s_sk) != mask_keys[u]:
            raise IntegrityError("a reconstructed mask key does not match its public key")
        seeds = pair_seeds(s_sk, {v: mask_keys[v] for v in masked_with[u]}, round_id)
        # v added sign(v, u) * mask; subtract the same.
        _secagg.add_masks(
            total, ((-_secagg.pair_sign(v, u), prg.expand(seed)) for v, seed in seeds.items())
        )
    return total
