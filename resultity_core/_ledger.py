"""Ledger arithmetic in integer micro-credits: pure functions over an immutable state.

Money lives in two places: account balances and open reservations. ``credit`` is the only
operation that changes the total (it mints, and the state records how much in ``minted``);
``reserve``, ``settle`` and ``release`` move credits between the two places and between
accounts, so ``sum(balances) + sum(reservations) == minted`` always holds. No balance and no
reservation is ever negative. Every function returns a new state and leaves its argument
unchanged; a refused operation raises a ``LedgerError`` and changes nothing.

Settlement policy: a charge above the reserved amount is refused
(``ChargeExceedsReservationError``) unless the caller passes ``cap_to_reservation=True``, in
which case the payer is charged exactly the reservation. Refusing is the default because the
Cloud reserves the worst case before a job starts; a larger charge means a pricing bug or a
dishonest receipt, which must not be hidden. The payee's share is floored; the remainder of the
charge goes to the platform account, so nothing is created or lost by rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._errors import (
    AccountExistsError,
    ChargeExceedsReservationError,
    DuplicateReservationError,
    InsufficientCreditsError,
    InvalidAmountError,
    UnknownAccountError,
    UnknownReservationError,
)

__all__ = [
    "BASIS_POINTS",
    "PLATFORM_ACCOUNT",
    "LedgerState",
    "Reservation",
    "Settlement",
    "credit",
    "ledger_total",
    "open_account",
    "release",
    "reserve",
    "settle",
]

BASIS_POINTS = 10_000
PLATFORM_ACCOUNT = "platform"


def _check_int(value: object, field: str, *, minimum: int = 0) -> int:
    # bool is an int subclass; True as an amount is always a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmountError(field, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidAmountError(field, f"must be >= {minimum}, got {value}")
    return value


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidAmountError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidAmountError(field, "must not be empty")
    return value


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@attrs.frozen
class Reservation:
    """Credits held for one job: taken from ``account``'s balance until settled or released."""

    reservation_id: str
    account: str
    amount: int


@attrs.frozen
class Settlement:
    """How one settled reservation was split; ``payer_charge == payee_amount + platform_amount``.

    ``refunded`` went back to the payer's balance (the reserved amount minus the charge).
    """

    reservation_id: str
    payer: str
    payee: str
    platform: str
    reserved: int
    payer_charge: int
    payee_amount: int
    platform_amount: int
    refunded: int


@attrs.frozen
class LedgerState:
    """Balances by account id, open reservations by id, and the total ever minted.

    Construct it empty (``LedgerState()``) and evolve it with the module's functions. The
    mappings are read-only views; each operation builds new ones.
    """

    balances: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    reservations: Mapping[str, Reservation] = attrs.field(factory=dict, converter=_freeze)
    minted: int = 0

    def __attrs_post_init__(self) -> None:
        # Checked on every state, so one rebuilt from storage is as trustworthy as one evolved.
        _check_int(self.minted, "minted")
        for account, amount in self.balances.items():
            _check_id(account, "balances")
            _check_int(amount, f"balances[{account!r}]")
        for key, reservation in self.reservations.items():
            if not isinstance(reservation, Reservation) or reservation.reservation_id != key:
                raise InvalidAmountError(f"reservations[{key!r}]", "must be its Reservation")
            _check_int(reservation.amount, f"reservations[{key!r}].amount")
            if reservation.account not in self.balances:
                raise InvalidAmountError(
                    f"reservations[{key!r}].account", f"unknown account {reservation.account!r}"
                )
        if ledger_total(self) != self.minted:
            held = ledger_total(self)
            raise InvalidAmountError(
                "minted", f"is {self.minted} but balances and reservations hold {held}"
            )

    def balance(self, account: str) -> int:
        """Return the spendable balance of ``account``; raises UnknownAccountError."""
        try:
            return self.balances[account]
        except KeyError:
            raise UnknownAccountError(account) from None

    def reserved(self, account: str) -> int:
        """Return the total held in open reservations of ``account`` (0 if none)."""
        return sum(r.amount for r in self.reservations.values() if r.account == account)


def ledger_total(state: LedgerState) -> int:
    """Return ``sum(balances) + sum(reservations)``; equals ``state.minted`` in a valid state."""
    return sum(state.balances.values()) + sum(r.amount for r in state.reservations.values())


def _require_account(state: LedgerState, account: str) -> None:
    if account not in state.balances:
        raise UnknownAccountError(account)


def open_account(state: LedgerState, account: str, initial: int = 0) -> LedgerState:
    """Return a state with a new account holding ``initial`` minted micro-credits.

    Raises AccountExistsError if the id is taken and InvalidAmountError for a bad id or amount.
    """
    _check_id(account, "account")
    _check_int(initial, "initial")
    if account in state.balances:
        raise AccountExistsError(f"account {account!r} already exists")
    balances = dict(state.balances)
    balances[account] = initial
    return attrs.evolve(state, balances=balances, minted=state.minted + initial)


def credit(state: LedgerState, account: str, amount: int) -> LedgerState:
    """Return a state where ``amount`` new micro-credits are minted into ``account``.

    This is the only operation that changes the ledger's total. Raises UnknownAccountError and
    InvalidAmountError.
    """
    _check_id(account, "account")
    _check_int(amount, "amount")
    _require_account(state, account)
    balances = dict(state.balances)
    balances[account] += amount
    return attrs.evolve(state, balances=balances, minted=state.minted + amount)


def reserve(state: LedgerState, reservation_id: str, account: str, amount: int) -> LedgerState:
    """Return a state where ``amount`` is moved from ``account``'s balance into a reservation.

    Raises DuplicateReservationError if ``reservation_id`` is open, UnknownAccountError,
    InsufficientCreditsError if the balance would go negative, InvalidAmountError.
    """
    _check_id(reservation_id, "reservation_id")
    _check_id(account, "account")
    _check_int(amount, "amount")
    if reservation_id in state.reservations:
        raise DuplicateReservationError(f"reservation {reservation_id!r} is already open")
    balance = state.balance(account)
    if amount > balance:
        raise InsufficientCreditsError(account, balance, amount)
    balances = dict(state.balances)
    balances[account] = balance - amount
    reservations = dict(state.reservations)
    reservations[reservation_id] = Reservation(reservation_id, account, amount)
    return attrs.evolve(state, balances=balances, reservations=reservations)


def settle(
    state: LedgerState,
    reservation_id: str,
    charge: int,
    payee_account: str,
    *,
    payee_share_bps: int | None = None,
    payee_amount: int | None = None,
    platform_account: str = PLATFORM_ACCOUNT,
    cap_to_reservation: bool = False,
) -> tuple[LedgerState, Settlement]:
    """Close a reservation: the payer pays ``charge``, the rest of the reservation is refunded.

    Exactly one of ``payee_share_bps`` (0..10000, the payee gets ``charge * bps // 10000``) or
    ``payee_amount`` (0..charge) says what the payee earns; the remainder of the charge goes to
    ``platform_account``. Returns the new state and the Settlement. Raises
    UnknownReservationError, UnknownAccountError (payee or platform),
    ChargeExceedsReservationError (unless ``cap_to_reservation``), InvalidAmountError.
    """
    _check_id(reservation_id, "reservation_id")
    _check_int(charge, "charge")
    _check_id(payee_account, "payee_account")
    _check_id(platform_account, "platform_account")
    if (payee_share_bps is None) == (payee_amount is None):
        raise InvalidAmountError(
            "payee_share_bps", "give exactly one of payee_share_bps and payee_amount"
        )
    if payee_share_bps is not None:
        _check_int(payee_share_bps, "payee_share_bps")
        if payee_share_bps > BASIS_POINTS:
            raise InvalidAmountError(
                "payee_share_bps", f"must be <= {BASIS_POINTS}, got {payee_share_bps}"
            )
    else:
        _check_int(payee_amount, "payee_amount")
    try:
        reservation = state.reservations[reservation_id]
    except KeyError:
        raise UnknownReservationError(reservation_id) from None
    _require_account(state, payee_account)
    _require_account(state, platform_account)
    if charge > reservation.amount:
        if not cap_to_reservation:
            raise ChargeExceedsReservationError(
                f"charge {charge} exceeds reservation {reservation_id!r} of {reservation.amount}"
            )
        charge = reservation.amount
    if payee_share_bps is not None:
        earned = charge * payee_share_bps // BASIS_POINTS
    else:
        assert payee_amount is not None
        if payee_amount > charge:
            raise InvalidAmountError(
                "payee_amount", f"must be <= the charge {charge}, got {payee_amount}"
            )
        earned = payee_amount
    settlement = Settlement(
        reservation_id=reservation_id,
        payer=reservation.account,
        payee=payee_account,
        platform=platform_account,
        reserved=reservation.amount,
        payer_charge=charge,
        payee_amount=earned,
        platform_amount=charge - earned,
        refunded=reservation.amount - charge,
    )
    balances = dict(state.balances)
    balances[reservation.account] += settlement.refunded
    balances[payee_account] += settlement.payee_amount
    balances[platform_account] += settlement.platform_amount
    reservations = dict(state.reservations)
    del reservations[reservation_id]
    return attrs.evolve(state, balances=balances, reservations=reservations), settlement


def release(state: LedgerState, reservation_id: str) -> LedgerState:
    """Return a state where the whole reservation goes back to its account (nothing charged).

    Raises UnknownReservationError and InvalidAmountError (bad id).
    """
    _check_id(reservation_id, "reservation_id")
    try:
        reservation = state.reservations[reservation_id]
    except KeyError:
        raise UnknownReservationError(reservation_id) from None
    balances = dict(state.balances)
    balances[reservation.account] += reservation.amount
    reservations = dict(state.reservations)
    del reservations[reservation_id]
    return attrs.evolve(state, balances=balances, reservations=reservations)
